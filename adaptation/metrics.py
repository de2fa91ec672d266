"""Segmentation metrics: confusion-matrix mIoU (ignore index 255) and flow-based temporal consistency.

Two temporal-consistency metrics, each with one name in every report:
* ``tc`` (``temporal_consistency``): the share of warp-valid pixels whose label at t equals the
  flow-warped label of t-1 (UnifiedVideoDA's ``pred_pred`` / ESVS's TC); what evaluation reports.
* ``tc_iou`` (``temporal_iou_confusion``): the mean over classes of the IoU between the labels at t
  and the warped labels of t-1, which a prediction of one class everywhere cannot game; the gate's.
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


def temporal_consistency(pred_t: np.ndarray, pred_prev: np.ndarray, flow: np.ndarray) -> tuple[int, int]:
    """(agreeing pixels, valid pixels) between the prediction at t and the flow-warped prediction at t-1."""
    warped, valid = warp_labels_np(pred_prev, flow)
    return int(((warped == pred_t) & valid).sum()), int(valid.sum())


def temporal_iou_confusion(pred_t: np.ndarray, pred_prev: np.ndarray, flow: np.ndarray,
                           num_classes: int) -> np.ndarray:
    """Confusion counts between the labels at t and the flow-warped labels of t-1 (warp-valid pixels
    with labels >= 0 on both sides); ``iou_from_confusion`` of their sum gives ``tc_iou``."""
    warped, ok = warp_labels_np(pred_prev, flow)
    keep = ok & (warped >= 0) & (pred_t >= 0)
    return confusion_matrix(pred_t[keep], warped[keep], num_classes)
