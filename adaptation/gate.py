"""Validation gate: may an adapted candidate replace its parent? Pure computation, no I/O.

Both models segment held-out target clips that adaptation never saw (streaming ACCEL inference,
as the service runs them: ``models.stream.predict_stream`` with the clips' flow). The candidate passes when:
  * its weights and predictions are finite;
  * no class collapses: every class the parent predicts on more than ``vanish_share`` of the pixels
    is still predicted on at least ``vanish_floor`` of them, the entropy of the candidate's class
    distribution keeps ``min_entropy_ratio`` of the parent's, and the two distributions differ by
    at most ``max_class_tv`` (total variation distance);
  * its temporal consistency ``tc_class_iou`` (reported as ``tc_iou_*``) is not worse than the parent's
    by more than ``tc_tolerance`` points: the mean over classes of the IoU between the prediction at t
    and the flow-warped prediction at t-1, so that a parent which labels everything with one class is
    not rewarded for it (``tc_pixel_agreement``, ``tc`` in evaluation reports, is reported as
    ``tc_pixel_*``; ``adaptation.metrics``);
  * it labels at least ``min_agreement`` percent of the pixels as the parent does.
With labeled validation clips the decision is mIoU >= parent mIoU + ``miou_margin`` (plus finite
weights); the unsupervised checks are then reported as warnings only.

Statistical gate (``adaptation.stat_gate``): with 2 or more clips, the raw comparisons above are replaced by
a percentile bootstrap over clips of the mean per-clip change (candidate - parent). Labeled: the lower end
of the ``confidence`` interval of the per-clip mIoU change must be >= ``miou_margin``. Unlabeled: the same
bound of the per-clip temporal-consistency change (the proxy) must be >= -``tc_tolerance``; a proxy is
weaker evidence than labels (it measures flicker, not correctness). The interval is recorded in
``metrics["stat_gate"]`` (labeled mode also records the proxy's as ``metrics["stat_gate_proxy"]``); with one
clip the raw comparison decides and ``metrics["stat_gate"]`` says so.

Measured on the synthetic benchmark (bench/adaptation.py): on strong shifts a source model can
label most of a foggy frame as one class, and a correctly adapted candidate then agrees with it
on only 15-20 % of the pixels and moves the class distribution by a total variation of ~0.7.
The defaults are therefore loose bounds that catch collapse, noise and divergence, not a
closeness requirement; a labeled validation clip is the only way to prove an improvement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.stream import predict_stream

from . import stat_gate
from .clips import TargetClip
from .metrics import TemporalConsistency, confusion_matrix, miou


@dataclass(frozen=True)
class GateThresholds:
    vanish_share: float = 0.01  # a class the parent predicts on more than 1 % of the pixels ...
    vanish_floor: float = 0.001  # ... must keep at least 0.1 % of them
    min_entropy_ratio: float = 0.5  # class-distribution entropy: candidate >= ratio x parent
    max_class_tv: float = 0.8  # total variation distance between predicted class distributions
    tc_tolerance: float = 2.0  # temporal consistency (class-mean IoU, percent) may drop this much
    min_agreement: float = 10.0  # percent of pixels labeled as the parent does
    miou_margin: float = 0.0  # labeled: candidate mIoU >= parent mIoU + margin
    confidence: float = stat_gate.DEFAULT_CONFIDENCE  # two-sided bootstrap interval (>= 2 clips)
    resamples: int = stat_gate.DEFAULT_RESAMPLES
    bootstrap_seed: int = stat_gate.DEFAULT_SEED


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reference:
    """The parent's predictions, computed once and reusable across candidates."""

    heldout_preds: list[np.ndarray]
    val_preds: list[np.ndarray] | None


def _is_module(model: Any) -> bool:
    return isinstance(model, nn.Module)


def weights_finite(model: Any) -> bool:
    """True when every parameter and floating buffer is finite (engines without tensors: True)."""
    if not _is_module(model):
        return True
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _predict(model: Any, clip: TargetClip) -> np.ndarray:
    """(T, h, w) int64 labels at the clip's size with the clip's flow; -1 marks non-finite logits."""
    return predict_stream(model, clip.frames, clip.flows)


def compute_reference(parent: Any, heldout: Sequence[TargetClip],
                      val: Sequence[TargetClip] | None = None) -> Reference:
    """Run the parent once over the held-out (and validation) clips."""
    return Reference([_predict(parent, c) for c in heldout],
                     None if val is None else [_predict(parent, c) for c in val])


def _class_shares(preds: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, np.float64)
    for p in preds:
        counts += np.bincount(p[p >= 0].ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


def _tc(preds: Sequence[np.ndarray], clips: Sequence[TargetClip], num_classes: int) -> tuple[float, float]:
    """(``tc_class_iou``, ``tc_pixel_agreement``) in percent over the clips (``adaptation.metrics``)."""
    tc = TemporalConsistency(num_classes)
    for pred, clip in zip(preds, clips):
        tc.add_clip(pred, clip.flows)
    return tc.tc_class_iou(), tc.tc_pixel_agreement() or 0.0


def _entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def _miou(preds: Sequence[np.ndarray], clips: Sequence[TargetClip], num_classes: int,
          classes: Sequence[str] | None) -> dict[str, Any]:
    conf = np.zeros((num_classes, num_classes), np.int64)
    for pred, clip in zip(preds, clips):
        if clip.labels is None:
            raise ValueError("validation clips must carry labels")
        lab = clip.labels.astype(np.int64)
        p = np.where(pred < 0, (lab + 1) % num_classes, pred)  # non-finite pixels count as wrong
        conf += confusion_matrix(p, lab, num_classes)
    return miou(conf, list(classes) if classes is not None else None)


def gate(parent: Any, candidate: Any, heldout: Sequence[TargetClip], val: Sequence[TargetClip] | None = None,
         thresholds: GateThresholds = GateThresholds(), num_classes: int | None = None,
         classes: Sequence[str] | None = None) -> GateReport:
    """Decide whether ``candidate`` may replace ``parent`` (a model, an engine, or a ``Reference``)."""
    if not heldout:
        raise ValueError("the gate needs at least one held-out clip")
    if num_classes is None:
        num_classes = len(classes) if classes is not None else _num_classes(candidate)
    th = thresholds
    metrics: dict[str, Any] = {"heldout_frames": int(sum(len(c) for c in heldout))}
    if not weights_finite(candidate):
        return GateReport(False, ["candidate has non-finite weights"], {**metrics, "finite": False})
    ref = parent if isinstance(parent, Reference) else compute_reference(parent, heldout, val)
    cand = [_predict(candidate, c) for c in heldout]
    if any((p < 0).any() for p in cand):
        return GateReport(False, ["candidate produces non-finite logits"], {**metrics, "finite": False})
    metrics["finite"] = True
    checks: list[str] = []
    p_par, p_cand = _class_shares(ref.heldout_preds, num_classes), _class_shares(cand, num_classes)
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    metrics["class_share_parent"] = {n: round(float(v) * 100, 2) for n, v in zip(names, p_par)}
    metrics["class_share_candidate"] = {n: round(float(v) * 100, 2) for n, v in zip(names, p_cand)}
    for c in range(num_classes):
        if p_par[c] > th.vanish_share and p_cand[c] < th.vanish_floor:
            checks.append(f"class {names[c]!r} collapsed: parent predicts it on {p_par[c] * 100:.1f}% of "
                          f"held-out pixels, candidate on {p_cand[c] * 100:.2f}%")
    h_par, h_cand = _entropy(p_par), _entropy(p_cand)
    metrics["class_entropy_parent"], metrics["class_entropy_candidate"] = round(h_par, 4), round(h_cand, 4)
    if h_cand < th.min_entropy_ratio * h_par:
        checks.append(f"class distribution collapsed: entropy {h_cand:.3f} < {th.min_entropy_ratio} x parent "
                      f"{h_par:.3f}")
    tv = 0.5 * float(np.abs(p_par - p_cand).sum())
    metrics["class_tv"] = round(tv, 4)
    if tv > th.max_class_tv:
        checks.append(f"class distribution moved too far: total variation {tv:.3f} > {th.max_class_tv}")
    (tc_par, px_par), (tc_cand, px_cand) = _tc(ref.heldout_preds, heldout, num_classes), _tc(cand, heldout,
                                                                                             num_classes)
    metrics["tc_iou_parent"], metrics["tc_iou_candidate"] = round(tc_par, 2), round(tc_cand, 2)
    metrics["tc_pixel_parent"], metrics["tc_pixel_candidate"] = round(px_par, 2), round(px_cand, 2)
    if len(heldout) >= 2:
        tc_diffs = [_tc([c], [clip], num_classes)[0] - _tc([p], [clip], num_classes)[0]
                    for c, p, clip in zip(cand, ref.heldout_preds, heldout)]
        proxy = _decide(tc_diffs, "temporal consistency", -th.tc_tolerance, th)
        metrics["stat_gate_proxy" if val else "stat_gate"] = proxy.to_dict()
        if not proxy.passed:
            checks.append(f"temporal consistency may have dropped: lower bound {proxy.interval.lower:.2f} of the "
                          f"mean per-clip change < -{th.tc_tolerance}")
    elif tc_cand < tc_par - th.tc_tolerance:
        checks.append(f"temporal consistency dropped: {tc_cand:.1f}% < parent {tc_par:.1f}% - {th.tc_tolerance}")
        metrics["stat_gate"] = _one_clip_note()
    else:
        metrics["stat_gate"] = _one_clip_note()
    agree = sum(int((a == b).sum()) for a, b in zip(cand, ref.heldout_preds))
    total = sum(a.size for a in cand)
    agreement = 100.0 * agree / max(total, 1)
    metrics["agreement"] = round(agreement, 2)
    if agreement < th.min_agreement:
        checks.append(f"agreement with the parent {agreement:.1f}% < {th.min_agreement}%")
    if val:
        if ref.val_preds is None:
            raise ValueError("the reference was computed without validation clips")
        cand_val = [_predict(candidate, c) for c in val]
        m_par = _miou(ref.val_preds, val, num_classes, classes)
        m_cand = _miou(cand_val, val, num_classes, classes)
        metrics["miou_parent"], metrics["miou_candidate"] = round(m_par["miou"], 2), round(m_cand["miou"], 2)
        metrics["warnings"] = checks
        if len(val) >= 2:  # the statistical gate: bootstrap over clips of the per-clip mIoU change
            diffs = [_miou([c], [clip], num_classes, classes)["miou"] - _miou([p], [clip], num_classes, classes)["miou"]
                     for c, p, clip in zip(cand_val, ref.val_preds, val)]
            if not all(math.isfinite(d) for d in diffs):
                return GateReport(False, ["per-clip validation mIoU is not finite"], metrics)
            decision = _decide(diffs, "mIoU", th.miou_margin, th)
            metrics["stat_gate"] = decision.to_dict()
            iv = decision.interval
            reasons = [] if decision.passed else [
                f"labeled validation mIoU: lower bound {iv.lower:.2f} of the {iv.confidence:.0%} interval of the "
                f"mean per-clip change (mean {iv.mean:+.2f}, {iv.n_clips} clips) < {th.miou_margin:g}"]
            return GateReport(decision.passed, reasons, metrics)
        metrics["stat_gate"] = _one_clip_note()
        ok = math.isfinite(m_cand["miou"]) and m_cand["miou"] >= m_par["miou"] + th.miou_margin
        reasons = [] if ok else [f"labeled validation mIoU {m_cand['miou']:.2f} < parent {m_par['miou']:.2f}"
                                 + (f" + {th.miou_margin}" if th.miou_margin else "")]
        return GateReport(ok, reasons, metrics)
    return GateReport(not checks, checks, metrics)


def _decide(diffs: Sequence[float], statistic: str, threshold: float,
            th: GateThresholds) -> stat_gate.StatDecision:
    return stat_gate.decide(diffs, statistic, threshold, th.confidence, th.resamples, th.bootstrap_seed)


def _one_clip_note() -> dict[str, Any]:
    return {"applied": False, "n_clips": 1,
            "note": "one clip: no bootstrap interval; the raw comparison decided (see the module docstring)"}


def _num_classes(model: Any) -> int:
    if _is_module(model):
        return int(model.num_classes)
    return int(model.meta["architecture"]["num_classes"])
