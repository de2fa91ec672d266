"""The source-statistics method (srcstats) and the few-label path, on tiny models and toy data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptation.clips import PairSampler, TargetClip, prepare_clip
from adaptation.fewlabel import WithLabels, labeled_frames
from adaptation.methods import build_method
from adaptation.methods.srcstats import MissingSourceStats, corrected_posterior, estimate_confusion
from adaptation.methods.supervised import SourceOnly
from adaptation.source_stats import compute_source_stats
from adaptation.trainer import TrainConfig, train
from models.accel import build_model
from models.config import get_config

SIZE = (32, 64)
ROWS = 3  # toy scenes: class 0 in the top third, 1 in the middle, 2 at the bottom


def toy_clip(colours: list[tuple[int, int, int]], frames: int = 4, seed: int = 0,
             order: tuple[int, ...] = (0, 1, 2)) -> TargetClip:
    """Frames of three horizontal bands (classes ``order`` top to bottom) in the classes' colours, with noise."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    rows = np.asarray(order)[np.repeat(np.arange(ROWS), h // ROWS + 1)[:h]]
    labels = np.repeat(rows[:, None], w, axis=1).astype(np.uint8)
    imgs = []
    for _ in range(frames):
        img = np.asarray(colours, np.float32)[labels] + rng.normal(0, 8, (h, w, 3))
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return prepare_clip(np.stack(imgs), SIZE, flows=np.zeros((frames, h, w, 2), np.float32),
                        labels=np.stack([labels] * frames))


SOURCE = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
PERMUTED = [SOURCE[1], SOURCE[2], SOURCE[0]]  # each class wears the next one's colour


def trained_on_source(steps: int = 60) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_config("mini-os8", num_classes=3))
    # trained on every order of the bands (it learns colours), its statistics on the usual order
    orders = [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2), (2, 1, 0)]
    sampler = PairSampler([toy_clip(SOURCE, seed=s, order=o) for s, o in enumerate(orders)], 4, seed=0)
    train(model, SourceOnly(head_lr_mult=1.0), sampler, TrainConfig(steps=steps, lr=3e-3))
    model.eval()
    clip = toy_clip(SOURCE, seed=5)
    model.source_stats = compute_source_stats(model, list(clip.frames), list(clip.labels))
    return model


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    torch.set_num_threads(1)
    return trained_on_source()


def accuracy(model: torch.nn.Module, clip: TargetClip) -> float:
    with torch.no_grad():
        x = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float()
        logits = torch.nn.functional.interpolate(model.eval().frame(x)["main"], size=SIZE, mode="bilinear")
    return float((logits.argmax(1).numpy() == clip.labels).mean())


def test_em_recovers_a_permutation_from_the_position_prior() -> None:
    cells, k = 12, 3
    prior = np.zeros((cells, k))
    prior[np.arange(cells), np.arange(cells) * k // cells] = 0.9  # class by position, mostly
    prior += 0.1 / k
    prior /= prior.sum(1, keepdims=True)
    perm = np.array([1, 2, 0])  # true class c is predicted as perm[c]
    counts = np.zeros((cells, k))
    for cell in range(cells):
        counts[cell, perm] = prior[cell] * 1000
    m = estimate_confusion(counts, prior, iterations=200)
    assert (m.argmax(0) == perm).all(), m
    same = estimate_confusion(prior * 1000, prior, iterations=200)
    assert (same.argmax(0) == np.arange(k)).all() and np.diag(same).min() > 0.8
    probs = torch.eye(k)[perm][None, :, :, None].permute(0, 2, 1, 3)  # (1, K, 3 pixels, 1): predicted perm[c]
    q = corrected_posterior(probs, torch.from_numpy(m).float(), torch.full((k, k, 1), 1 / k), torch.ones(k) / k, 1.0)
    assert q.argmax(1).flatten().tolist() == [0, 1, 2]


def test_needs_stored_statistics() -> None:
    method = build_method("srcstats")
    with pytest.raises(MissingSourceStats, match="source statistics"):
        method.setup(build_model(get_config("mini-os8")))
    with pytest.raises(ValueError, match="pl_weight"):
        build_method("srcstats", pl_weight=0.0, align_weight=0.0)


def test_alignment_moves_features_toward_the_stored_statistics(source_model: torch.nn.Module) -> None:
    import copy

    model = copy.deepcopy(source_model)
    dark = toy_clip([(c[0] // 3, c[1] // 3, c[2] // 3) for c in SOURCE], seed=9)  # a photometric shift
    method = build_method("srcstats", pl_weight=0.0, align_weight=1.0, params="all")
    result = train(model, method, PairSampler([dark], 2, seed=0), TrainConfig(steps=15, lr=1e-3, log_every=1))
    first, last = result.history[0]["align"], np.mean([h["align"] for h in result.history[-3:]])
    assert last < 0.7 * first, (first, last)


def test_srcstats_undoes_a_permutation_without_labels(source_model: torch.nn.Module) -> None:
    import copy

    target = toy_clip(PERMUTED, seed=3)
    assert accuracy(source_model, target) < 0.2  # confidently wrong everywhere
    model = copy.deepcopy(source_model)
    method = build_method("srcstats", proportion=1.0)
    train(model, method, PairSampler([target], 2, seed=0), TrainConfig(steps=30, lr=3e-3))
    assert accuracy(model, toy_clip(PERMUTED, seed=4)) > 0.7  # from < 0.2 (4x8 logits: band edges blur)


def test_labeled_frames_fix_a_permutation_self_training_keeps(source_model: torch.nn.Module) -> None:
    """TENT alone cannot discover the swap; with 4 labeled target frames mixed into the loop it can."""
    import copy

    target, test = toy_clip(PERMUTED, seed=3), toy_clip(PERMUTED, seed=4)
    runs = {}
    for k in (0, 4):
        model = copy.deepcopy(source_model)
        method = build_method("tent", params="all")
        if k:
            method = WithLabels(method, *labeled_frames([toy_clip(PERMUTED, frames=6, seed=8)], k))
        train(model, method, PairSampler([target], 2, seed=0), TrainConfig(steps=30, lr=3e-3))
        runs[k] = accuracy(model, test)
    assert runs[0] < 0.2 and runs[4] > 0.9, runs


def test_labeled_frame_selection() -> None:
    clips = [toy_clip(SOURCE, frames=3, seed=1), toy_clip(SOURCE, frames=3, seed=2)]
    frames, labels = labeled_frames(clips, 4)
    assert frames.shape == (4, *SIZE, 3) and labels.shape == (4, *SIZE)
    with pytest.raises(ValueError, match="between 1 and 4"):
        labeled_frames(clips, 5)
    with pytest.raises(ValueError, match="hold 0"):
        labeled_frames([TargetClip(clips[0].frames, clips[0].flows)], 2)


def test_the_driver_trains_on_labeled_frames_when_asked(source_model: torch.nn.Module) -> None:
    from adaptation.sourcefree import AdaptConfig, adapt
    from models.checkpoint import make_meta
    from models.classes import palette_for

    names = ["a", "b", "c"]
    meta = make_meta(get_config("mini-os8", num_classes=3), names, palette_for(names), SIZE)
    clips = [toy_clip(PERMUTED, frames=6, seed=s) for s in (3, 4)]
    unlabeled = [TargetClip(c.frames, c.flows) for c in clips]
    labeled = [toy_clip(PERMUTED, frames=6, seed=8)]
    cfg = AdaptConfig(method="tent", options={"params": "all"}, steps=30, lr=3e-3, labeled_frames=4)
    result = adapt(source_model, meta, unlabeled[:1], cfg, heldout=unlabeled[1:], labeled=labeled)
    assert result.meta["provenance"]["hyperparameters"]["labeled_frames"] == 4
    inherited = result.model.source_stats  # the candidate carries its parent's statistics (publish stores them)
    assert inherited is not None and inherited.same_as(source_model.source_stats)
    assert accuracy(result.model, clips[1]) > 0.9
    with pytest.raises(ValueError, match="hold 0"):
        adapt(source_model, meta, unlabeled[:1], cfg, heldout=unlabeled[1:])
    with pytest.raises(ValueError, match="need a method that trains"):
        AdaptConfig(method="bn", labeled_frames=2).resolved()


def test_cli_refuses_labeled_frames_without_a_labeled_clip(tmp_path, capsys) -> None:
    from service.cli import main

    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    assert main(["adapt", "--video", str(video), "--labeled-frames", "2", "-o", str(tmp_path / "o")]) == 2
    assert "--labeled-frames needs the labeled clip" in capsys.readouterr().err
    assert main(["adapt", "--video", str(video), "--labeled-frames", "5", "-o", str(tmp_path / "o")]) == 2
    assert "between 0 and 4" in capsys.readouterr().err
