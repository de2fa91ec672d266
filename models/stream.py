"""Streaming ACCEL prediction of a clip, the one way the adaptation side runs a model over frames.

One network forward per frame: the per-frame logits of t-1 are cached and fused with those of t
through the flow t -> t-1 (``AccelSegmenter.stream_step``); the first frame is a keyframe fused with
itself. The gate (``adaptation.gate``) and the clip evaluation (``adaptation.clip_eval``) call
``predict_stream``; ``service.pipeline.StreamSegmenter`` runs the same step on live frames.
Pure: no state survives a call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray | None]  # (frame t-1, frame t) -> (H, W, 2) or None
StepFn = Callable[[np.ndarray, Any, np.ndarray | None], tuple[torch.Tensor, Any]]


def _torch_step(model: nn.Module) -> StepFn:
    model.eval()
    device = next(model.parameters()).device

    def step(x: np.ndarray, prev: torch.Tensor | None, flow: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            f = torch.from_numpy(flow).to(device) if flow is not None else None
            fused, cur = model.stream_step(torch.from_numpy(x).to(device), prev, f)  # type: ignore[operator]
            return fused.float().cpu(), cur
    return step


def _engine_step(engine: Any) -> StepFn:
    """``engine``: numpy ``frame_logits(frames)`` / ``fuse(current, previous, flow)`` (``service.engine``)."""
    def step(x: np.ndarray, prev: np.ndarray | None, flow: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray]:
        cur = engine.frame_logits(x)
        fused = engine.fuse(cur, cur, None) if prev is None else engine.fuse(cur, prev, flow)
        return torch.from_numpy(fused).float(), cur
    return step


def predict_stream(model: Any, frames: np.ndarray, flows: np.ndarray | None = None,
                   flow_fn: FlowFn | None = None) -> np.ndarray:
    """Labels (T, H, W) int64 for frames (T, H, W, 3) RGB 0..255; -1 where the logits are not finite.

    ``model``: an ``AccelSegmenter`` (eval mode, inference mode) or an engine with numpy
    ``frame_logits`` / ``fuse``. The flow t -> t-1 (backward, pixels) is ``flows[t]`` of a
    (T, H, W, 2) array, else ``flow_fn(frame t-1, frame t)``, else none (unwarped fusion).
    Fused logits are upsampled (bilinear, align_corners=True) to the frame size, then argmax.
    """
    step = _torch_step(model) if isinstance(model, nn.Module) else _engine_step(model)
    h, w = frames.shape[1:3]
    prev: Any = None
    out = []
    for t in range(len(frames)):
        x = np.ascontiguousarray(frames[t:t + 1].transpose(0, 3, 1, 2), dtype=np.float32)
        flow = None
        if t > 0:
            f = flows[t] if flows is not None else flow_fn(frames[t - 1], frames[t]) if flow_fn is not None else None
            flow = None if f is None else np.ascontiguousarray(f.transpose(2, 0, 1)[None], dtype=np.float32)
        fused, prev = step(x, prev, flow)
        up = F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=True)[0]
        labels = up.argmax(0).numpy().astype(np.int64)
        labels[~torch.isfinite(up).all(0).numpy()] = -1
        out.append(labels)
    return np.stack(out)
