"""Evaluate an ACCEL model on labeled in-memory clips with streaming reuse (as the service runs it)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from models.accel import AccelSegmenter
from models.flow import DISFlow

from .metrics import confusion_matrix, miou, temporal_consistency


@torch.inference_mode()
def predict_clip(model: AccelSegmenter, frames: np.ndarray, flows: np.ndarray | None = None,
                 flow_mode: str = "gt") -> np.ndarray:
    """Labels (T, H, W) uint8 for frames (T, H, W, 3) uint8, one network forward per frame.

    ``flow_mode``: ``gt`` uses ``flows`` (T, H, W, 2) backward; ``dis`` estimates it; ``none`` fuses unwarped.
    """
    model.eval()
    device = next(model.parameters()).device
    dis = DISFlow() if flow_mode == "dis" else None
    prev_logits, out = None, []
    h, w = frames.shape[1:3]
    for t, frame in enumerate(frames):
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float().to(device)
        flow = None
        if t > 0 and flow_mode != "none":
            f = flows[t] if flow_mode == "gt" and flows is not None else dis(frames[t - 1], frame)  # type: ignore[misc]
            flow = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float().to(device)
        fused, prev_logits = model.stream_step(x, prev_logits, flow)
        up = F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=True)
        out.append(up.argmax(1)[0].to(torch.uint8).cpu().numpy())
    return np.stack(out)


def evaluate_clips(model: AccelSegmenter, clips: Iterable, classes: list[str] | tuple[str, ...],
                   flow_mode: str = "gt") -> dict[str, object]:
    """mIoU (percent), per-class IoU and temporal consistency (percent, with the clips' exact flow).

    ``clips`` yields objects with ``frames``, ``labels`` and ``flow`` (e.g. ``adaptation.synth.Clip``).
    """
    n = len(classes)
    conf = np.zeros((n, n), dtype=np.int64)
    agree = valid = 0
    for clip in clips:
        pred = predict_clip(model, clip.frames, clip.flow, flow_mode)
        conf += confusion_matrix(pred, clip.labels, n)
        for t in range(1, len(pred)):
            a, v = temporal_consistency(pred[t], pred[t - 1], clip.flow[t])
            agree, valid = agree + a, valid + v
    result = miou(conf, classes)
    result["tc"] = 100.0 * agree / max(valid, 1)
    return result
