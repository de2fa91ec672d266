"""Inference engines: the boundary between serving code and a backend (numpy frames in, numpy logits out).

An engine runs the two halves of the ACCEL model separately so that streams can cache the
per-frame logits of t-1: ``frame_logits`` (the per-frame network) and ``fuse`` (warp + 1x1 fusion);
``models.stream.stream_step`` is the step made of the two. The per-frame logits stay in the engine's
own form between the calls (a tensor on the device for ``TorchEngine``, an array for ONNX Runtime):
``fuse`` makes the one transfer of a frame's logits to the host. ``TorchEngine`` lives here;
``OnnxEngine`` is in ``service.onnx_engine``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from models.accel import AccelSegmenter


class Engine(Protocol):
    version: str  # model version this engine serves (registry name, or a checkpoint path)
    meta: dict[str, Any]  # checkpoint meta.json
    backend: str  # "torch" | "onnxruntime"
    provider: str  # what runs the network: the ONNX Runtime execution provider, or torch's device type

    def frame_logits(self, frames: np.ndarray) -> Any:
        """(N, 3, h, w) float32 RGB 0..255 at the model input size -> (N, C, h/s, w/s) logits in the
        engine's own form (rows may be sliced; ``fuse`` of the same engine takes them)."""
        ...

    def fuse(self, current: Any, previous: Any, flow: np.ndarray | None) -> np.ndarray:
        """Fuse current logits with previous logits warped by ``flow`` ((N, 2, h, w) backward, pixels
        of the input grid, or None for unwarped). Returns fused (N, C, h/s, w/s) float32 logits."""
        ...


class TorchEngine:
    """Eager torch engine: ``inference_mode``, optional half precision on CUDA. ``frame_logits`` returns a
    tensor on the engine's device, in its precision; ``fuse`` takes those (or numpy arrays) and returns numpy."""

    backend = "torch"

    def __init__(self, model: AccelSegmenter, meta: dict[str, Any], version: str = "local",
                 device: str = "cpu", half: bool = False) -> None:
        self.device = torch.device(device)
        self.half = half and self.device.type == "cuda"
        self.model = model.eval().to(self.device)
        if self.half:
            self.model = self.model.half()
        self.meta, self.version = meta, version
        self.provider = self.device.type  # "cpu" | "cuda"
        self.input_size = tuple(meta["input_size"])
        self.num_classes = int(meta["architecture"]["num_classes"])

    def _tensor(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        """On the engine's device in its precision (a no-op for this engine's own logits)."""
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        t = t.to(self.device)
        return t.half() if self.half else t.float()

    def frame_logits(self, frames: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.frame(self._tensor(frames))["main"]

    def fuse(self, current: np.ndarray | torch.Tensor, previous: np.ndarray | torch.Tensor,
             flow: np.ndarray | None) -> np.ndarray:
        with torch.inference_mode():
            f = None if flow is None else self._tensor(flow)
            fused, _ = self.model.fuse(self._tensor(current), self._tensor(previous), f)
            return fused.float().cpu().numpy()
