"""Evaluate an ACCEL model on labeled in-memory clips with streaming reuse (as the service runs it)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from models.accel import AccelSegmenter
from models.flow import DISFlow
from models.stream import predict_stream

from .metrics import confusion_matrix, miou, temporal_consistency

FLOW_MODES = ("gt", "dis", "none")


def evaluate_clips(model: AccelSegmenter, clips: Iterable, classes: list[str] | tuple[str, ...],
                   flow_mode: str = "gt") -> dict[str, object]:
    """mIoU (percent), per-class IoU and temporal consistency (percent, with the clips' exact flow).

    ``clips`` yields objects with ``frames``, ``labels`` and ``flow`` (e.g. ``adaptation.synth.Clip``).
    ``flow_mode``: the flow the model fuses with: ``gt`` the clip's, ``dis`` estimated, ``none`` unwarped.
    Non-finite logits count as class 0. TC is the pixel agreement with the clip's exact flow.
    """
    if flow_mode not in FLOW_MODES:
        raise ValueError(f"unknown flow mode {flow_mode!r}; choose one of {FLOW_MODES}")
    n = len(classes)
    conf = np.zeros((n, n), dtype=np.int64)
    agree = valid = 0
    for clip in clips:
        pred = np.maximum(predict_stream(model, clip.frames, clip.flow if flow_mode == "gt" else None,
                                         DISFlow() if flow_mode == "dis" else None), 0)
        conf += confusion_matrix(pred, clip.labels, n)
        for t in range(1, len(pred)):
            a, v = temporal_consistency(pred[t], pred[t - 1], clip.flow[t])
            agree, valid = agree + a, valid + v
    result = miou(conf, classes)
    result["tc"] = 100.0 * agree / max(valid, 1)
    return result
