"""The validation gate: passes an identical candidate, rejects NaN, collapsed and regressed ones."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptation.clips import TargetClip
from adaptation.gate import GateThresholds, compute_reference, gate
from models.accel import build_model
from models.config import get_config
from models.stream import predict_stream
from service.engine import TorchEngine

SIZE = (64, 128)


def make_clip(seed: int, frames: int = 4) -> TargetClip:
    rng = np.random.default_rng(seed)
    h, w = SIZE
    base = np.kron(rng.random((h // 8, w // 8 + 2, 3)) * 255, np.ones((8, 8, 1)))
    imgs = np.stack([base[:, 2 * (frames - t): 2 * (frames - t) + w] for t in range(frames)]).astype(np.uint8)
    flows = np.zeros((frames, h, w, 2), np.float32)
    flows[1:, :, :, 0] = 2.0
    return TargetClip(imgs, flows)


@pytest.fixture(scope="module")
def parent() -> torch.nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_model(get_config("mini-os8")).eval()


@pytest.fixture(scope="module")
def heldout() -> list[TargetClip]:
    return [make_clip(s) for s in range(2)]


def test_identical_candidate_passes(parent, heldout):
    report = gate(parent, copy.deepcopy(parent), heldout)
    assert report.passed, report.reasons
    assert report.metrics["agreement"] == 100.0
    assert report.metrics["tc_iou_candidate"] == report.metrics["tc_iou_parent"]
    assert report.metrics["class_tv"] == 0.0


def test_engine_parent_and_reference_reuse(parent, heldout):
    meta = {"architecture": {"num_classes": 7}, "input_size": list(SIZE)}
    engine = TorchEngine(copy.deepcopy(parent), meta)
    assert np.array_equal(predict_stream(engine, heldout[0].frames, heldout[0].flows),
                          predict_stream(parent, heldout[0].frames, heldout[0].flows))
    ref = compute_reference(engine, heldout)
    report = gate(ref, copy.deepcopy(parent), heldout, num_classes=7)
    assert report.passed, report.reasons


def test_nan_candidate_rejected(parent, heldout):
    bad = copy.deepcopy(parent)
    with torch.no_grad():
        bad.net.head.conv2d_list[0].weight[0, 0, 0, 0] = float("nan")
    report = gate(parent, bad, heldout)
    assert not report.passed
    assert "non-finite" in report.reasons[0]


def test_collapsed_candidate_rejected(parent, heldout):
    collapsed = copy.deepcopy(parent)
    with torch.no_grad():  # the classifier now says "class 3" whatever it sees
        collapsed.net.head.conv2d_list[0].bias.zero_()
        collapsed.net.head.conv2d_list[0].bias[3] = 100.0
    report = gate(parent, collapsed, heldout)
    assert not report.passed
    text = " ".join(report.reasons)
    assert "collapsed" in text and "total variation" in text and "agreement" in text
    assert report.metrics["class_share_candidate"]["3"] == 100.0


class NoiseEngine:
    """An engine whose logits are fresh noise every frame: plausible classes, no temporal coherence."""

    backend = "fake"

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.meta = {"architecture": {"num_classes": 7}}

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        n, _, h, w = frames.shape
        return self.rng.normal(size=(n, 7, h // 8, w // 8)).astype(np.float32)

    def fuse(self, current: np.ndarray, previous: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
        return current


def test_temporally_inconsistent_candidate_rejected(parent, heldout):
    report = gate(parent, NoiseEngine(), heldout, thresholds=GateThresholds(min_agreement=0.0))
    assert not report.passed
    assert any("temporal consistency" in r for r in report.reasons), report.reasons
    assert report.metrics["tc_iou_candidate"] < report.metrics["tc_iou_parent"] - 2


def test_labeled_validation_is_decisive(parent, heldout):
    val_frames = [make_clip(10 + s) for s in range(2)]
    worse = copy.deepcopy(parent)
    with torch.no_grad():
        for p in worse.net.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # Labels = the parent's own predictions: the parent scores 100 mIoU, a perturbed candidate less.
    val = [TargetClip(c.frames, c.flows, predict_stream(parent, c.frames, c.flows).astype(np.uint8))
           for c in val_frames]
    report = gate(parent, worse, heldout, val=val)
    assert not report.passed
    assert report.metrics["miou_parent"] == 100.0 and report.metrics["miou_candidate"] < 100.0
    assert "validation mIoU" in report.reasons[0]
    # The same candidate judged on labels it matches perfectly passes, even if proxies complain.
    val_good = [TargetClip(c.frames, c.flows, predict_stream(worse, c.frames, c.flows).astype(np.uint8))
                for c in val_frames]
    assert gate(parent, worse, heldout, val=val_good).passed


def test_gate_needs_heldout(parent):
    with pytest.raises(ValueError, match="at least one held-out clip"):
        gate(parent, parent, [])
