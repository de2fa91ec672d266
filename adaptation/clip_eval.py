"""Evaluate an ACCEL model on labeled in-memory clips with streaming reuse (``models.stream.predict_stream``,
the step the service runs)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from models.accel import AccelSegmenter
from models.flow import DISFlow
from models.stream import predict_stream

from .metrics import TemporalConsistency, confusion_matrix, miou

FLOW_MODES = ("gt", "dis", "none")


def evaluate_clips(model: AccelSegmenter, clips: Iterable, classes: list[str] | tuple[str, ...],
                   flow_mode: str = "gt") -> dict[str, object]:
    """mIoU (percent), per-class IoU and temporal consistency (percent, with the clips' exact flow).

    ``clips`` yields objects with ``frames``, ``labels`` and ``flow`` (e.g. ``adaptation.synth.Clip``).
    ``flow_mode``: the flow the model fuses with: ``gt`` the clip's, ``dis`` estimated, ``none`` unwarped.
    Non-finite logits count as class 0. ``tc`` is ``tc_pixel_agreement`` with the clip's exact flow.
    """
    if flow_mode not in FLOW_MODES:
        raise ValueError(f"unknown flow mode {flow_mode!r}; choose one of {FLOW_MODES}")
    n = len(classes)
    conf = np.zeros((n, n), dtype=np.int64)
    tc = TemporalConsistency()
    for clip in clips:
        pred = np.maximum(predict_stream(model, clip.frames, clip.flow if flow_mode == "gt" else None,
                                         DISFlow() if flow_mode == "dis" else None), 0)
        conf += confusion_matrix(pred, clip.labels, n)
        tc.add_clip(pred, clip.flow)
    result = miou(conf, classes)
    result["tc"] = tc.tc_pixel_agreement() or 0.0
    return result
