"""Offline UDA pieces: losses on hand-computed cases, discriminators, one training step per method."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import default_collate

from adaptation.datasets import build_dataset
from adaptation.discriminators import FCDiscriminator
from adaptation.methods import build_method
from adaptation.trainer import TrainConfig, train
from adaptation.uda_losses import (adversarial_bce, adversarial_lsgan, class_mix_mask, entropy_pseudo_labels,
                                   hflip_flow, histogram_match, interpolate_frame, mix, occlusion_mask, pair_input,
                                   pseudo_weight, weight_discrepancy, weighted_ce)
from models.accel import build_model
from models.classes import IGNORE_INDEX as IGNORE
from models.config import get_config
from models.warp import warp


# ---- losses -------------------------------------------------------------------------------------
def test_adversarial_losses_hand_cases() -> None:
    zeros = torch.zeros(2, 1, 3, 4)
    assert adversarial_bce(zeros, 0.0).item() == pytest.approx(math.log(2))
    assert adversarial_bce(torch.full_like(zeros, 20.0), 1.0).item() == pytest.approx(0.0, abs=1e-8)
    assert adversarial_lsgan(torch.full_like(zeros, 0.5), 0.0).item() == pytest.approx(0.25)
    assert adversarial_lsgan(torch.tensor([0.0, 2.0]), 1.0).item() == pytest.approx(1.0)


def test_weight_discrepancy_identical_opposite_orthogonal() -> None:
    a = [torch.randn(4, 3, 2, 2), torch.randn(5)]
    assert weight_discrepancy(a, [t.clone() for t in a]).item() == pytest.approx(2.0)
    assert weight_discrepancy(a, [-t for t in a]).item() == pytest.approx(0.0, abs=1e-6)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert weight_discrepancy([e1], [e2]).item() == pytest.approx(1.0)
    d1, d2 = FCDiscriminator(6, 4), FCDiscriminator(6, 4)
    d2.load_state_dict(d1.state_dict())
    assert weight_discrepancy(d1.conv_weights(), d2.conv_weights()).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        weight_discrepancy(a, a[:1])


def test_discriminator_output_shape_and_input_checks() -> None:
    d = FCDiscriminator(14, ndf=8)
    assert d(torch.rand(2, 14, 64, 128)).shape == (2, 1, 2, 4)
    assert len(d.conv_weights()) == 5
    with pytest.raises(ValueError, match="channels"):
        d(torch.rand(1, 7, 64, 128))
    with pytest.raises(ValueError, match="32x32"):
        d(torch.rand(1, 14, 16, 128))


def test_pair_input_has_one_softmax_per_frame() -> None:
    x = pair_input(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), (16, 32))
    assert x.shape == (2, 6, 16, 32)
    torch.testing.assert_close(x[:, :3].sum(1), torch.ones(2, 16, 32))
    torch.testing.assert_close(x[:, 3:].sum(1), torch.ones(2, 16, 32))


def test_histogram_match_maps_quantiles_and_reuses_the_mapping() -> None:
    x = torch.arange(100.0).view(1, 1, 10, 10).expand(1, 3, 10, 10).contiguous()
    ref = 2 * x + 10
    out, other = histogram_match(x, ref, x.clone())
    torch.testing.assert_close(out.flatten().sort().values, ref.flatten().sort().values)
    torch.testing.assert_close(other, out)


def test_interpolated_frame_follows_linear_motion() -> None:
    d = 2.0
    xs = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 3, 16, 32)
    i0, i1 = xs.clone(), xs + d  # I_1(p) = I_0(p + d): flow 1->0 is +d, flow 0->1 is -d
    f10 = torch.zeros(1, 2, 16, 32)
    f10[:, 0] = d
    f01 = -f10
    t = torch.tensor([0.25])
    it = interpolate_frame(i0, i1, f10, f01, t, alpha=0.5)
    torch.testing.assert_close(it[..., 4:-4], (xs + t * d)[..., 4:-4])
    # t = 0 and t = 1 reproduce the end frames (alpha weights aside, both terms agree)
    torch.testing.assert_close(interpolate_frame(i0, i1, f10, f01, torch.tensor([0.0]))[..., 4:-4], i0[..., 4:-4])


def test_occlusion_mask_forward_backward_check() -> None:
    f10 = torch.zeros(1, 2, 8, 16)
    f10[:, 0] = 3.0
    ok = occlusion_mask(f10, -f10, eta=1.0)
    assert ok[0, :, :12].all() and not ok[0, :, 13:].any()  # p + 3 leaves the frame at x > 12
    assert not occlusion_mask(f10, f10, eta=1.0).any()  # inconsistent flows: |3 + 3| >= 1


def test_entropy_pseudo_labels() -> None:
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]]).t().reshape(1, 4, 1, 2)
    assert entropy_pseudo_labels(probs, 0.3).tolist() == [[[0, IGNORE]]]
    keep = torch.tensor([[[False, True]]])
    assert entropy_pseudo_labels(probs, 0.3, keep).tolist() == [[[IGNORE, IGNORE]]]


def test_class_mix_and_weights() -> None:
    lab = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]]])
    mask = class_mix_mask(lab, torch.Generator().manual_seed(0))
    chosen = lab[mask.bool()].unique()
    assert len(chosen) == 2 and IGNORE not in chosen.tolist()  # half of 3 classes, rounded up
    assert all(bool((mask[lab == c] == 1).all()) for c in chosen.tolist())
    a, b = torch.ones(1, 3, 2, 4), torch.zeros(1, 3, 2, 4)
    assert torch.equal(mix(mask, a, b)[:, 0], mask)
    assert torch.equal(mix(mask, lab, torch.full_like(lab, 9)), torch.where(mask.bool(), lab, 9))
    probs = torch.tensor([0.99, 0.99, 0.99, 0.5]).view(1, 1, 2, 2)
    probs = torch.cat((probs, 1 - probs), 1)
    assert pseudo_weight(probs, 0.968).item() == pytest.approx(0.75)
    labels = torch.tensor([[[0, 1], [2, IGNORE]]])
    ce = weighted_ce(torch.zeros(1, 4, 2, 2), labels, torch.full((1, 2, 2), 0.5))
    assert ce.item() == pytest.approx(0.5 * math.log(4) * 3 / 4)


def test_hflip_flow_commutes_with_warping() -> None:
    prev = torch.rand(1, 3, 8, 12)
    flow = torch.randn(1, 2, 8, 12)
    a, _ = warp(prev.flip(-1), hflip_flow(flow))
    b, _ = warp(prev, flow)
    torch.testing.assert_close(a, b.flip(-1))


# ---- one step of every method ----------------------------------------------------------------------
SIZE = (64, 128)
METHOD_CASES = {
    "source-only": {},
    "davsn": {"ndf": 8},
    "davsn-ctcr": {"ndf": 8, "itcr": False},
    "davsn-itcr": {"ctcr": False},
    "tps": {},
    "i2vda": {"ndf": 8, "iter_launch": 0, "delta": 1.01},
    "uvda": {"threshold": 0.0},
    "uvda-video": {"consistent_mix": True, "refine": "consistency", "video_discriminator": True, "ndf": 8,
                   "threshold": 0.0},
    "uvda-forward": {"refine": "max-confidence", "direction": "forward", "threshold": 0.0},
}


@pytest.fixture(scope="module")
def data() -> dict:
    kw = dict(input_size=SIZE, clips=1, frames_per_clip=5)
    return {"source": build_dataset("synthetic:source", "train", extras=("prev2",), **kw),
            "target": build_dataset("synthetic:fog", "train", extras=("prev2", "next", "flow_fwd"), labels=False,
                                    **kw)}


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_one_training_step_per_method(case: str, data: dict) -> None:
    name = case.split("-")[0] if case != "source-only" else case
    kwargs = dict(METHOD_CASES[case])
    if name != "source-only" and name != "tps":
        kwargs["num_classes"] = 7
    torch.manual_seed(0)
    method = build_method(name, **kwargs)
    model = build_model(get_config("mini-os8"))
    source = default_collate([data["source"][0]])
    if name == "source-only":
        batch = source
    else:
        batch = {"source": source, "target": default_collate([data["target"][1]])}
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    result = train(model, method, [batch], TrainConfig(steps=1, lr=1e-2, optimizer="sgd"))
    logs = result.history[-1]
    assert result.steps == 1 and math.isfinite(logs["loss"])
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())
    has_disc = case in ("davsn", "davsn-ctcr", "i2vda", "uvda-video")
    assert ("aux_loss" in logs) == has_disc
    if case == "davsn-itcr":
        assert "itcr" in logs and "adv" not in logs
    if case == "davsn-ctcr":
        assert "adv" in logs and "itcr" not in logs
    if name == "i2vda":
        assert "tc" in logs  # the proxy network is launched at step 0 here
    if name == "uvda":
        assert method.teacher is not None  # EMA teacher built and updated


def test_davsn_needs_a_regulariser_and_uvda_validates_options() -> None:
    with pytest.raises(ValueError, match="source-only"):
        build_method("davsn", num_classes=7, ctcr=False, itcr=False)
    with pytest.raises(ValueError, match="refine"):
        build_method("uvda", num_classes=7, refine="oracle")


def test_interpolated_frames_stay_out_of_bn_running_statistics() -> None:
    from adaptation.methods.i2vda import bn_stats_frozen

    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).train()
    x = torch.randn(2, 3, 4, 4) * 5 + 3
    with bn_stats_frozen(bn):
        y = bn(x)
    assert torch.equal(bn[0].running_mean, torch.zeros(3)) and bn[0].momentum == 0.1
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)  # batch statistics used
