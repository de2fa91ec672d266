"""Optical-flow providers behind one interface.

Every provider returns a BACKWARD flow (see ``models.warp``): an (H, W, 2) float32 array of
(dx, dy) in pixels of the input frames, such that pixel p of ``current`` was at p + flow(p) in
``previous``. Resizing a flow field must scale its vectors: use ``resize_flow_np``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np


class FlowProvider(Protocol):
    name: str

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray | None:
        """Flow for two (H, W, 3) uint8 RGB frames; ``None`` means "no flow" (fuse unwarped)."""
        ...


def resize_flow_np(flow: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 2) flow to ``size`` = (h, w), scaling dx and dy by the grid ratios (align-corners)."""
    h0, w0 = flow.shape[:2]
    h, w = size
    if (h, w) == (h0, w0):
        return flow.astype(np.float32, copy=False)
    out = cv2.resize(flow.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    out[..., 0] *= (w - 1) / max(w0 - 1, 1)
    out[..., 1] *= (h - 1) / max(h0 - 1, 1)
    return out


class DISFlow:
    """OpenCV DIS optical flow on grey frames (CPU, no weights).

    Default preset measured by bench/streaming.py on synthetic clips at 256x512: where the pipeline
    uses the flow, at logit resolution (1/8), the presets carry labels from t-1 to t equally well
    (95.4-95.6 % for all three, 92.6 % with no flow), while fast costs ~2-3x and medium ~10x ultrafast.
    """

    PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}

    def __init__(self, preset: str = "ultrafast") -> None:
        if preset not in self.PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; choose one of {sorted(self.PRESETS)}")
        self.name = f"dis-{preset}"
        self._dis = cv2.DISOpticalFlow.create(self.PRESETS[preset])

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        g_prev = cv2.cvtColor(np.ascontiguousarray(previous), cv2.COLOR_RGB2GRAY)
        g_cur = cv2.cvtColor(np.ascontiguousarray(current), cv2.COLOR_RGB2GRAY)
        # DIS.calc(I0, I1) returns f with I0(p) ~ I1(p + f(p)): with I0 = current this is backward flow.
        return np.asarray(self._dis.calc(g_cur, g_prev, None))  # type: ignore[call-overload]  # stubs lack None


class NoFlow:
    """No motion compensation: the previous logits are fused unwarped."""

    name = "none"

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> None:
        return None


class GroundTruthFlow:
    """Exact flow supplied by the caller (the synthetic generator), consumed in frame order."""

    name = "gt"

    def __init__(self, flows: np.ndarray) -> None:
        self._flows = flows  # (T, H, W, 2); flows[0] unused
        self._index = 0

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        self._index += 1
        if self._index >= len(self._flows):
            raise IndexError("ground-truth flow exhausted: more frames than flow fields")
        return resize_flow_np(self._flows[self._index], current.shape[:2])


class RAFTFlow:
    """torchvision RAFT (small or large) with weights from a local file; never downloads."""

    def __init__(self, weights: str | Path, large: bool = False, iters: int = 12, device: str = "cpu") -> None:
        import torch
        from torchvision.models.optical_flow import raft_large, raft_small

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"RAFT weights not found: {path}")
        self.name = "raft-large" if large else "raft-small"
        self.model = (raft_large if large else raft_small)(weights=None, progress=False)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval().to(device)
        self.iters, self.device = iters, device

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        import torch

        h, w = current.shape[:2]
        ph, pw = (8 - h % 8) % 8, (8 - w % 8) % 8  # RAFT needs sizes divisible by 8

        def prep(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float().to(self.device)
            t = torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate")
            return t / 127.5 - 1.0

        with torch.inference_mode():
            # RAFT(img1, img2) estimates img1 -> img2; current -> previous is our backward flow.
            flow = self.model(prep(current), prep(previous), num_flow_updates=self.iters)[-1]
        return flow[0, :, :h, :w].permute(1, 2, 0).cpu().numpy()


def load_davsn_flow(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a DA-VSN precomputed flow file: int16 ``.npy`` holding flow x 10, backward t -> t-1,
    usually at half the frame resolution. Returns float32 (H, W, 2) pixels, resized to ``size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow file not found: {path}")
    raw = np.load(path, allow_pickle=False)
    if raw.ndim != 3 or 2 not in (raw.shape[-1], raw.shape[0]):
        raise ValueError(f"{path}: expected an (H, W, 2) flow array, got shape {raw.shape}")
    if raw.shape[-1] != 2:
        raw = np.transpose(raw, (1, 2, 0))
    flow = raw.astype(np.float32) / 10.0
    return resize_flow_np(flow, size) if size is not None else flow


def encode_davsn_flow(flow: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 pixels -> DA-VSN file content: int16 flow x 10 at half resolution
    (the inverse of ``load_davsn_flow`` up to rounding)."""
    h, w = flow.shape[:2]
    half = resize_flow_np(flow, (max(h // 2, 1), max(w // 2, 1)))
    return np.clip(np.rint(half * 10.0), -32768, 32767).astype(np.int16)


def build_flow(name: str, raft_weights: str | None = None) -> FlowProvider:
    """Provider by CLI name: ``dis`` (default preset), ``dis-<preset>``, ``none``, ``raft`` (needs weights)."""
    if name == "none":
        return NoFlow()
    if name == "dis":
        return DISFlow()
    if name.startswith("dis-"):
        return DISFlow(name[4:])
    if name in ("raft", "raft-small", "raft-large"):
        if not raft_weights:
            raise ValueError("--flow raft needs local RAFT weights (--raft-weights PATH); nothing is downloaded")
        return RAFTFlow(raft_weights, large=name == "raft-large")
    raise ValueError(f"unknown flow provider {name!r}; choose dis, dis-ultrafast, dis-fast, dis-medium, none or raft")
