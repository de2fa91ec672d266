"""Streaming ACCEL prediction: the one place where a model is run over frames as a stream.

``stream_step`` is the step: one per-frame network forward on frame t, whose logits are fused with the
cached per-frame logits of t-1 warped by the flow t -> t-1; a keyframe (no cached logits) is fused with
itself, unwarped. It serves every caller:

* ``service.stream_segmenter.StreamSegmenter`` (live streams, uploads, the worker's sources) steps an engine
  (``service.engine``) frame by frame and keeps the cache between calls;
* ``stream_logits`` runs it over a clip (model-native frames and flows): ``adaptation.evaluate``
  uses it on dataset items (frames k-2, k-1, k as a batch of three-frame clips);
* ``predict_stream`` turns a numpy clip into labels with it: the gate (``adaptation.gate``) and the
  clip evaluation (``adaptation.clip_eval``).

A model is anything with ``frame_logits(frames)`` and ``fuse(current, previous, flow)`` (``StreamModel``):
the service's engines, or an ``AccelSegmenter`` wrapped in ``ModuleStream``. Pure: no state survives a call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray | None]  # (frame t-1, frame t) -> (H, W, 2) or None


class StreamModel(Protocol):
    """The two halves of ACCEL. Logits stay in the model's own form (a tensor on its device, or an
    array) between the two calls; ``fuse`` returns fused logits in the form its caller consumes."""

    def frame_logits(self, frames: Any) -> Any:
        """(N, 3, h, w) float RGB 0..255 at the model input size -> (N, C, h/s, w/s) per-frame logits."""
        ...

    def fuse(self, current: Any, previous: Any, flow: Any | None) -> Any:
        """Fuse ``current`` with ``previous`` warped by ``flow`` ((N, 2, h, w) backward t -> t-1, pixels of
        the input grid; None: unwarped) -> fused (N, C, h/s, w/s) logits."""
        ...


def stream_step(model: StreamModel, frames: Any, previous: Any | None,
                flow: Any | None) -> tuple[Any, Any]:
    """One streaming step: (fused logits of ``frames``, their per-frame logits to cache for the next step).

    ``previous``: the per-frame logits of t-1 (None: a keyframe, fused with itself and unwarped, the
    ``flow`` is not used). One network forward per call.
    """
    current = model.frame_logits(frames)
    fused = model.fuse(current, current, None) if previous is None else model.fuse(current, previous, flow)
    return fused, current


class ModuleStream:
    """An ``AccelSegmenter`` as a ``StreamModel``: arrays or tensors in (moved to the model's device),
    main-head logits out as tensors on that device. Call it under ``torch.inference_mode()``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def frame_logits(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.model.frame(torch.as_tensor(frames, device=self.device))["main"]  # type: ignore[operator]

    def fuse(self, current: torch.Tensor, previous: torch.Tensor,
             flow: np.ndarray | torch.Tensor | None) -> torch.Tensor:
        f = None if flow is None else torch.as_tensor(flow, device=self.device)
        return self.model.fuse(current, previous, f)[0]  # type: ignore[operator]


def stream_logits(model: StreamModel, frames: Iterable[Any], flows: Iterable[Any | None]) -> Iterator[Any]:
    """Fused logits of each frame of a clip, streamed (``stream_step`` with the logits of the step before);
    ``flows[t]`` is the flow t -> t-1 (that of the first frame is not used)."""
    previous = None
    for x, flow in zip(frames, flows, strict=True):
        fused, previous = stream_step(model, x, previous, flow)
        yield fused


def predict_stream(model: Any, frames: np.ndarray, flows: np.ndarray | None = None,
                   flow_fn: FlowFn | None = None) -> np.ndarray:
    """Labels (T, H, W) int64 for frames (T, H, W, 3) RGB 0..255; -1 where the logits are not finite.

    ``model``: an ``AccelSegmenter`` (run in eval mode, inference mode) or a ``StreamModel`` with numpy
    inputs (an engine). The flow t -> t-1 (backward, pixels) is ``flows[t]`` of a (T, H, W, 2) array,
    else ``flow_fn(frame t-1, frame t)``, else none (unwarped fusion).
    Fused logits are upsampled (bilinear, align_corners=True) to the frame size, then argmax.
    """
    if isinstance(model, nn.Module):
        model.eval()
        model = ModuleStream(model)
    h, w = frames.shape[1:3]
    nchw = (np.ascontiguousarray(frames[t:t + 1].transpose(0, 3, 1, 2), dtype=np.float32) for t in range(len(frames)))
    out = []
    with torch.inference_mode():
        for fused in stream_logits(model, nchw, (_flow_at(t, frames, flows, flow_fn) for t in range(len(frames)))):
            up = F.interpolate(torch.as_tensor(fused).float().cpu(), size=(h, w), mode="bilinear",
                               align_corners=True)[0]
            labels = up.argmax(0).numpy().astype(np.int64)
            labels[~torch.isfinite(up).all(0).numpy()] = -1
            out.append(labels)
    return np.stack(out)


def _flow_at(t: int, frames: np.ndarray, flows: np.ndarray | None, flow_fn: FlowFn | None) -> np.ndarray | None:
    """The flow t -> t-1 as a (1, 2, H, W) float32 array, or None (first frame, or no flow)."""
    if t == 0:
        return None
    f = flows[t] if flows is not None else flow_fn(frames[t - 1], frames[t]) if flow_fn is not None else None
    return None if f is None else np.ascontiguousarray(f.transpose(2, 0, 1)[None], dtype=np.float32)
