"""Hand-checkable cases for the pure adaptation losses and the cross-frame augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from adaptation.augment import AugmentConfig, apply_augment, cross_frame_augment, sample_params
from adaptation.losses import (
    IGNORE_INDEX,
    anchor_loss,
    confident_topk,
    cross_entropy_ignore,
    entropy_map,
    itcr_loss,
    pixel_contrastive_loss,
    propagate,
    refine_pseudo_labels,
    sample_pixels,
    softmax_entropy,
    tent_loss,
)


def one_hot_probs(labels: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()


def test_entropy_one_hot_is_zero_and_uniform_is_max():
    c = 5
    onehot = one_hot_probs(torch.randint(0, c, (2, 3, 4)), c)
    assert torch.allclose(entropy_map(onehot), torch.zeros(2, 3, 4), atol=1e-6)
    uniform = torch.full((1, c, 2, 2), 1.0 / c)
    assert torch.allclose(entropy_map(uniform), torch.ones(1, 2, 2), atol=1e-6)
    mixed = torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0]).view(1, c, 1, 1)
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(c)
    assert entropy_map(mixed).item() == pytest.approx(expected, rel=1e-5)


def test_tent_entropy_in_nats():
    logits = torch.zeros(1, 4, 2, 2)  # uniform: entropy log(4)
    assert softmax_entropy(logits)[0, 0, 0].item() == pytest.approx(math.log(4), rel=1e-6)
    assert tent_loss(logits).item() == pytest.approx(math.log(4), rel=1e-6)
    peaked = torch.zeros(1, 4, 2, 2)
    peaked[:, 0] = 50.0
    assert tent_loss(peaked).item() < 1e-6
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mixed = logits.clone()
    mixed[:, 0, 0, 0] = 50.0
    assert tent_loss(mixed, mask).item() < 1e-6


def test_itcr_zero_when_predictions_agree():
    logits = torch.randn(2, 4, 5, 6)
    probs, ent, valid = propagate(logits, torch.zeros(2, 2, 5, 6))
    assert torch.allclose(probs, logits.softmax(1), atol=1e-6)
    assert itcr_loss(logits, probs, ent, valid).item() == pytest.approx(0.0, abs=1e-7)


def test_itcr_hand_case_and_gradient_only_through_current():
    # 1 pixel, 2 classes. Current p = (0.5, 0.5) (max entropy); previous is confident (0.9, 0.1).
    cur = torch.zeros(1, 2, 1, 1, requires_grad=True)
    prev_logits = torch.tensor([math.log(0.9), math.log(0.1)]).view(1, 2, 1, 1).requires_grad_(True)
    probs, ent, valid = propagate(prev_logits, None)
    loss = itcr_loss(cur, probs, ent, valid)
    # mean over C*H*W = 2 elements of |0.5-0.9| and |0.5-0.1|
    assert loss.item() == pytest.approx(0.4, rel=1e-5)
    loss.backward()
    assert cur.grad is not None and cur.grad.abs().sum() > 0
    assert prev_logits.grad is None  # the propagated prediction is a constant
    # Reversed roles: the current frame is the confident one -> no pull, loss 0.
    cur2 = torch.tensor([math.log(0.9), math.log(0.1)]).view(1, 2, 1, 1)
    probs2, ent2, valid2 = propagate(torch.zeros(1, 2, 1, 1), None)
    assert itcr_loss(cur2, probs2, ent2, valid2).item() == 0.0
    # Invalid warp -> no loss either.
    assert itcr_loss(cur.detach(), probs, ent, torch.zeros(1, 1, 1)).item() == 0.0


def test_propagate_follows_flow():
    prev = torch.zeros(1, 2, 1, 4)
    prev[0, 0, 0, 2] = 10.0  # class 0 at x=2 in t-1
    flow = torch.zeros(1, 2, 1, 4)
    flow[:, 0] = 1.0  # pixel x of t was at x+1 in t-1
    probs, _, valid = propagate(prev, flow)
    assert probs[0, :, 0, 1].argmax().item() == 0  # x=1 of t shows x=2 of t-1
    assert valid[0, 0, 3].item() == 0.0  # x=3 samples x=4: outside


@pytest.mark.parametrize("proportion", [0.7, 0.5, 1.0])
def test_confident_topk_keeps_proportion_per_class(proportion):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, 10) * 3
    probs = logits.softmax(1)
    labels, keep = confident_topk(probs, proportion)
    pred = probs.argmax(1)
    for c in range(3):
        n = int((pred == c).sum())
        kept = int((keep & (pred == c)).sum())
        assert kept == max(1, round(proportion * n))
        # the kept pixels of class c are its most confident ones
        conf = probs.max(1).values
        if 0 < kept < n:
            assert conf[keep & (pred == c)].min() >= conf[~keep & (pred == c)].max()
    assert torch.equal(labels[keep], pred[keep])
    assert (labels[~keep] == IGNORE_INDEX).all()


def test_sample_pixels_balanced_and_bounded():
    labels = torch.zeros(1, 20, 50, dtype=torch.long)
    labels[0, :2, :5] = 1  # 10 pixels of a rare class
    labels[0, 10:, :] = IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    idx = sample_pixels(labels, 100, g)
    picked = labels.flatten()[idx]
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert int((picked == 1).sum()) == 10 and int((picked == 0).sum()) == 90
    assert not (picked == IGNORE_INDEX).any()
    assert torch.equal(idx, sample_pixels(labels, 100, torch.Generator().manual_seed(0)))


def test_contrastive_lower_for_matching_than_shuffled_pairs():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(4).repeat_interleave(8)
    q = centres[labels] + 0.05 * torch.randn(32, 16)
    k = centres[labels] + 0.05 * torch.randn(32, 16)
    matched = pixel_contrastive_loss(q, labels, k, labels, 0.07)
    shuffled = pixel_contrastive_loss(q, labels, k, labels[torch.randperm(32)], 0.07)
    assert matched.item() < shuffled.item()
    assert matched.item() >= 0.0


def test_contrastive_hand_case():
    # One query, one positive at cosine 1, one negative at cosine 0, tau = 1:
    # -log(e / (e + 1))
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = pixel_contrastive_loss(q, torch.tensor([0]), k, torch.tensor([0, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-5)
    # no positive key at all -> skipped -> 0, and gradients stay finite
    qq = q.clone().requires_grad_(True)
    none = pixel_contrastive_loss(qq, torch.tensor([2]), k, torch.tensor([0, 1]))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(qq.grad).all()


def test_contrastive_finite_gradient_without_negatives():
    q = torch.randn(5, 8, requires_grad=True)
    loss = pixel_contrastive_loss(q, torch.zeros(5, dtype=torch.long), torch.randn(6, 8),
                                  torch.zeros(6, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


def _probs(labels: list[int], conf: list[float], c: int = 3) -> torch.Tensor:
    p = torch.zeros(1, c, 1, len(labels))
    for i, (lab, cf) in enumerate(zip(labels, conf)):
        p[0, :, 0, i] = (1 - cf) / (c - 1)
        p[0, lab, 0, i] = cf
    return p


def test_refinement_strategies():
    cur = _probs([0, 1, 2, 0], [0.9, 0.5, 0.6, 0.8])
    prop = _probs([0, 2, 2, 1], [0.6, 0.9, 0.7, 0.9])
    valid = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    cons = refine_pseudo_labels(cur, prop, valid, "consistency")
    assert cons[0, 0].tolist() == [0, IGNORE_INDEX, 2, IGNORE_INDEX]
    maxc = refine_pseudo_labels(cur, prop, valid, "max-confidence")
    assert maxc[0, 0].tolist() == [0, 2, 2, 0]
    warp = refine_pseudo_labels(cur, prop, valid, "warp-frame")
    assert warp[0, 0].tolist() == [0, 2, 2, 0]
    warp_drop = refine_pseudo_labels(cur, prop, valid, "warp-frame", fill_invalid=False)
    assert warp_drop[0, 0].tolist() == [0, 2, 2, IGNORE_INDEX]
    thr = refine_pseudo_labels(cur, prop, valid, "max-confidence", threshold=0.85)
    assert thr[0, 0].tolist() == [0, 2, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="unknown refinement"):
        refine_pseudo_labels(cur, prop, valid, "oracle")


def test_cross_entropy_ignore_and_anchor():
    logits = torch.zeros(1, 4, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), IGNORE_INDEX)
    zero = cross_entropy_ignore(logits, labels)
    assert zero.item() == 0.0 and not torch.isnan(zero)
    labels[0, 0, 0] = 1
    assert cross_entropy_ignore(logits, labels).item() == pytest.approx(math.log(4), rel=1e-6)
    big = torch.zeros(1, 4, 4, dtype=torch.long)  # labels at a higher resolution are resized
    assert cross_entropy_ignore(logits, big).item() == pytest.approx(math.log(4), rel=1e-6)
    anchor = torch.zeros(1, 4, 2, 2)
    assert anchor_loss(logits, anchor, 0.9).item() == 0.0  # an unconfident anchor gives no target
    anchor[:, 2] = 20.0
    assert anchor_loss(logits, anchor, 0.9).item() == pytest.approx(math.log(4), rel=1e-6)


def test_cross_frame_augment_uses_same_parameters_on_both_frames():
    g = torch.Generator().manual_seed(3)
    frames = torch.rand(3, 3, 16, 24) * 255
    cfg = AugmentConfig(blur_p=1.0, jitter_p=1.0, gray_p=0.0)
    a, b, params = cross_frame_augment(frames, frames.clone(), cfg, g)
    assert torch.allclose(a, b)  # identical inputs -> identical outputs: one draw for both frames
    assert not torch.allclose(a, frames)
    assert a.min() >= 0 and a.max() <= 255
    again = apply_augment(frames, params)
    assert torch.allclose(again, a)
    identity = sample_params(3, AugmentConfig(blur_p=0.0, jitter_p=0.0, gray_p=0.0), g)
    assert torch.allclose(apply_augment(frames, identity), frames, atol=1e-3)
