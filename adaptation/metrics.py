"""Segmentation metrics: confusion-matrix mIoU (ignore index 255) and flow-based temporal consistency.

Two temporal-consistency metrics over pairs (labels at t, labels at t-1 warped to t by the flow t -> t-1),
one name each, both computed by ``TemporalConsistency``:
* ``tc_pixel_agreement``: the share (percent) of warp-valid pixels whose label at t equals the warped
  label of t-1 (UnifiedVideoDA's ``pred_pred`` / ESVS's TC). Reported as ``tc`` by the evaluations
  (``vss eval``, ``adaptation.evaluate``, ``adaptation.clip_eval``, the benchmarks) and as
  ``tc_pixel_parent`` / ``tc_pixel_candidate`` by the gate.
* ``tc_class_iou``: the mean over classes of the IoU between the labels at t and the warped labels of
  t-1 (percent), which a prediction of one class everywhere cannot game. Reported by the gate as
  ``tc_iou_parent`` / ``tc_iou_candidate``, and the metric it decides on.
"""

from __future__ import annotations

import numpy as np

from models.classes import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} shapes differ")
    keep = (label != ignore_index) & (label < num_classes)
    idx = label[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for classes absent from both prediction and ground truth."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def miou(conf: np.ndarray, classes: list[str] | tuple[str, ...] | None = None) -> dict[str, object]:
    """``{"miou": percent, "per_class": {name: percent}}`` over classes present in GT or prediction."""
    ious = iou_from_confusion(conf)
    names = list(classes) if classes is not None else [str(i) for i in range(len(ious))]
    valid = ~np.isnan(ious)
    return {
        "miou": float(np.nanmean(ious) * 100) if valid.any() else float("nan"),
        "per_class": {n: (round(float(v) * 100, 2) if not np.isnan(v) else None) for n, v in zip(names, ious)},
    }


def warp_labels_np(prev_labels: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour backward warp of an (H, W) label map of t-1 to t; returns (warped, valid mask)."""
    h, w = prev_labels.shape
    ys, xs = np.mgrid[0:h, 0:w]
    x = np.rint(xs + flow[..., 0]).astype(np.int64)
    y = np.rint(ys + flow[..., 1]).astype(np.int64)
    valid = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    warped = prev_labels[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)]
    return warped, valid


class TemporalConsistency:
    """Both temporal-consistency metrics (module docstring), accumulated over (t, t-1) pairs.

    ``num_classes`` is needed for ``tc_class_iou`` only (it also costs a confusion matrix per pair).
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.agree = self.valid = 0
        self.confusion = None if num_classes is None else np.zeros((num_classes, num_classes), np.int64)

    def add(self, pred_t: np.ndarray, pred_prev: np.ndarray, flow: np.ndarray) -> None:
        """One pair: (H, W) labels at t and t-1 and the (H, W, 2) flow t -> t-1 between them."""
        warped, valid = warp_labels_np(pred_prev, flow)
        self.agree += int(((warped == pred_t) & valid).sum())
        self.valid += int(valid.sum())
        if self.confusion is not None:
            assert self.num_classes is not None
            keep = valid & (warped >= 0) & (pred_t >= 0)  # -1 marks non-finite logits (models.stream)
            self.confusion += confusion_matrix(pred_t[keep], warped[keep], self.num_classes)

    def add_clip(self, preds: np.ndarray, flows: np.ndarray) -> TemporalConsistency:
        """Every consecutive pair of a clip's labels (T, H, W) with its flows (T, H, W, 2); returns self."""
        for t in range(1, len(preds)):
            self.add(preds[t], preds[t - 1], flows[t])
        return self

    def tc_pixel_agreement(self) -> float | None:
        """Percent of the warp-valid pixels that agree; None without any."""
        return 100.0 * self.agree / self.valid if self.valid else None

    def tc_class_iou(self) -> float:
        """Mean over the classes seen of the IoU (percent) of t against warped t-1; 100 when none was seen."""
        if self.confusion is None:
            raise ValueError("tc_class_iou needs TemporalConsistency(num_classes)")
        ious = iou_from_confusion(self.confusion)
        return float(np.nanmean(ious)) * 100 if (~np.isnan(ious)).any() else 100.0
