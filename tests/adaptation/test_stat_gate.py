"""The statistical gate: a percentile bootstrap over clips of the per-clip change decides (>= 2 clips)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptation.clips import TargetClip
from adaptation.gate import GateThresholds, _miou, gate
from adaptation.stat_gate import bootstrap_interval, bootstrap_lower_bound, decide
from models.stream import predict_stream
from tests.adaptation.test_gate import make_clip, parent  # noqa: F401  (the module-scoped model fixture)

ONE_BIG_WIN = [30.0] + [-1.0] * 7  # mean +2.9, but 34 % of resamples miss the win and average -1


def test_bootstrap_is_deterministic_per_seed():
    diffs = np.random.default_rng(3).normal(0.5, 2.0, size=12)
    a, b = bootstrap_interval(diffs, seed=7), bootstrap_interval(diffs, seed=7)
    assert a == b and a.resamples == 2000 and a.confidence == 0.95 and a.n_clips == 12
    assert a.lower < a.mean < a.upper and a.mean == pytest.approx(diffs.mean())
    assert bootstrap_interval(diffs, seed=8).lower != a.lower
    assert bootstrap_lower_bound(diffs, seed=7) == a.lower
    assert bootstrap_interval(diffs, confidence=0.5, seed=7).lower > a.lower  # narrower interval


def test_decide_rules():
    assert decide([2.0, 1.0, 3.0, 0.5], "mIoU").passed  # better on every clip
    assert not decide([-2.0, -1.0, -3.0, 4.0], "mIoU").passed  # worse on most clips
    big = decide(ONE_BIG_WIN, "mIoU")
    assert big.interval.mean > 0 and big.interval.lower < 0 and not big.passed
    assert decide([-1.0, -0.5, -1.5], "tc", threshold=-2.0).passed  # within the proxy's tolerance
    d = decide([1.0, 2.0], "mIoU").to_dict()
    assert {"passed", "statistic", "threshold", "lower", "mean", "upper", "n_clips", "confidence", "rule"} <= set(d)


@pytest.mark.parametrize("bad", [[], [1.0], [1.0, float("nan")]])
def test_bootstrap_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bootstrap_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 2.0], confidence=1.0)


@pytest.fixture(scope="module")
def candidate(parent):  # noqa: F811
    cand = copy.deepcopy(parent)
    with torch.no_grad():
        for p in cand.net.head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return cand


@pytest.fixture(scope="module")
def val_clips():
    return [make_clip(20 + s, frames=2) for s in range(8)]


def labeled(parent, candidate, clips, shares):  # noqa: F811
    """Clip i labeled by the candidate on a random ``shares[i]`` of its pixels and by the parent elsewhere."""
    out, rng = [], np.random.default_rng(0)
    for clip, share in zip(clips, shares):
        par, cand = (predict_stream(m, clip.frames, clip.flows) for m in (parent, candidate))
        lab = np.where(rng.random(par.shape) < share, cand, par)
        out.append(TargetClip(clip.frames, clip.flows, lab.astype(np.uint8)))
    return out


def per_clip_diffs(parent, candidate, clips):  # noqa: F811
    score = [_miou([predict_stream(m, c.frames, c.flows)], [c], 7, None)["miou"]
             for m in (candidate, parent) for c in clips]
    return np.array(score[:len(clips)]) - np.array(score[len(clips):])


def test_gate_accepts_a_candidate_better_on_every_clip(parent, candidate, val_clips):  # noqa: F811
    val = labeled(parent, candidate, val_clips, [1.0] * len(val_clips))
    assert (per_clip_diffs(parent, candidate, val) > 0).all()
    report = gate(parent, candidate, val_clips[:2], val=val)
    assert report.passed, report.reasons
    s = report.metrics["stat_gate"]
    assert s["statistic"] == "mIoU" and s["n_clips"] == 8 and 0 < s["lower"] <= s["mean"] <= s["upper"]
    assert "stat_gate_proxy" in report.metrics  # the unsupervised proxy is still reported


def test_gate_rejects_a_candidate_worse_on_most_clips(parent, candidate, val_clips):  # noqa: F811
    val = labeled(parent, candidate, val_clips, [1.0, 1.0] + [0.0] * 6)
    assert (per_clip_diffs(parent, candidate, val) < 0).sum() == 6
    report = gate(parent, candidate, val_clips[:2], val=val)
    assert not report.passed and "lower bound" in report.reasons[0]
    assert report.metrics["stat_gate"]["lower"] < 0


def test_gate_rejects_one_big_win_and_many_small_losses(parent, candidate, val_clips):  # noqa: F811
    # Clip 0 labeled by the candidate, the others 54 % by the parent: one big win (+92), seven losses (-1..-26).
    val = labeled(parent, candidate, val_clips, [1.0] + [0.46] * 7)
    diffs = per_clip_diffs(parent, candidate, val)
    assert diffs.mean() > 0 and diffs[0] > 0 and (diffs[1:] < 0).all(), diffs
    report = gate(parent, candidate, val_clips[:2], val=val)
    s = report.metrics["stat_gate"]
    assert report.metrics["miou_candidate"] > report.metrics["miou_parent"] or s["mean"] > 0
    assert not report.passed and s["mean"] > 0 > s["lower"]
    again = gate(parent, candidate, val_clips[:2], val=val)
    assert again.metrics["stat_gate"] == s  # fixed seed: the same interval


def test_one_clip_keeps_the_raw_rule(parent, candidate, val_clips):  # noqa: F811
    val = labeled(parent, candidate, val_clips[:1], [1.0])
    report = gate(parent, candidate, val_clips[:1], val=val)
    assert report.passed and report.metrics["stat_gate"]["applied"] is False
    assert "raw comparison" in report.metrics["stat_gate"]["note"]


def test_unlabeled_gate_records_the_proxy_interval(parent, val_clips):  # noqa: F811
    report = gate(parent, copy.deepcopy(parent), val_clips[:3])
    s = report.metrics["stat_gate"]
    assert report.passed and s["statistic"] == "temporal consistency" and s["n_clips"] == 3
    assert s["lower"] == s["mean"] == s["upper"] == 0.0 and s["threshold"] == -GateThresholds().tc_tolerance
