"""Pure functions for optical-flow warping.

Flow convention used everywhere in vss: a flow field is BACKWARD, from frame t to frame t-1.
``flow[:, 0]`` is dx and ``flow[:, 1]`` is dy, in pixels of the grid it is stored at: pixel
p = (x, y) of frame t shows the point that was at p + flow(p) in frame t-1. Warping frame t-1
(or its logits) to frame t samples t-1 at p + flow(p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an (N, 2, H, W) flow field to ``size`` = (h, w) and scale its vectors to the new grid.

    With align_corners=True pixel centres map i -> i * (h-1)/(H-1), so vectors scale by the same
    factor per axis (x and y separately; DA-VSN scaled both by the height ratio, which is wrong for
    non-matching aspect ratios).
    """
    n, c, h0, w0 = flow.shape
    if c != 2:
        raise ValueError(f"flow must have 2 channels (dx, dy), got shape {tuple(flow.shape)}")
    h, w = size
    if (h, w) == (h0, w0):
        return flow
    out = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=True)
    sx = (w - 1) / (w0 - 1) if w0 > 1 else 1.0
    sy = (h - 1) / (h0 - 1) if h0 > 1 else 1.0
    scale = torch.tensor([sx, sy], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)
    return out * scale


def flow_to_grid(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid in [-1, 1] (align_corners=True) and validity mask for a backward flow (N, 2, H, W)."""
    n, _, h, w = flow.shape
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    valid = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    gx = 2.0 * x / max(w - 1, 1) - 1.0
    gy = 2.0 * y / max(h - 1, 1) - 1.0
    return torch.stack((gx, gy), dim=-1), valid.unsqueeze(1).to(flow.dtype)


def warp(x: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``x`` (N, C, H, W) of frame t-1 to frame t with ``flow`` (N, 2, H, W) t->t-1.

    Returns ``(warped, valid)``: border padding outside the frame, and a (N, 1, H, W) mask that is
    1 where the sample point p + flow(p) lies inside frame t-1. Differentiable w.r.t. ``x``.
    """
    if x.shape[-2:] != flow.shape[-2:]:
        flow = resize_flow(flow, (x.shape[-2], x.shape[-1]))
    if flow.shape[0] != x.shape[0]:
        raise ValueError(f"batch mismatch: x {tuple(x.shape)} vs flow {tuple(flow.shape)}")
    grid, valid = flow_to_grid(flow.to(x.dtype))
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=True)
    return out, valid
