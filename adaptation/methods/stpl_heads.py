"""STPL's own modules: the spatio-temporal fusion block and the projection head (discarded after adaptation).

Fusion ops (STPL §3.1, Table 4) take the flow-warped t-1 features and the t features, each
(N, C, H, W), and return one spatio-temporal feature map:
  * ``stam``: Spatio-Temporal Attention Module (appendix A1, eq. 5-7) over the (T=2) stack, then the
    T frames are concatenated along channels (2C);
  * ``concat``: [z'_{t-1}, z_t] (2C); ``conv1x1``: a 1x1 conv 2C -> C; ``add``: z'_{t-1} + z_t (C);
  * ``none``: z_t alone (C), for the spatial-only and temporal-only variants.
"""

from __future__ import annotations

import torch
from torch import nn

FUSIONS = ("stam", "concat", "conv1x1", "add", "none")


class STAM(nn.Module):
    """z = A_spa(A_tem(z') * z') * (A_tem(z') * z') + z' on z' of shape (N, T, C, H, W).

    Temporal attention A_tem (N, T, 1, 1, 1) = sigmoid(FC(avgpool(z')) + FC(maxpool(z'))) with pools
    over (C, H, W) per frame and one shared two-layer FC over the T axis; spatial attention
    A_spa (N, 1, 1, H, W) = sigmoid(conv7x7([avgpool, maxpool])) with pools over (T, C), CBAM style.
    """

    def __init__(self, frames: int = 2, hidden: int = 8, kernel: int = 7) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(frames, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, frames))
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 5:
            raise ValueError(f"STAM expects (N, T, C, H, W), got {tuple(z.shape)}")
        avg, mx = z.mean((2, 3, 4)), z.amax((2, 3, 4))  # (N, T)
        a_tem = torch.sigmoid(self.fc(avg) + self.fc(mx))[:, :, None, None, None]
        zt = a_tem * z
        flat = zt.flatten(1, 2)  # (N, T*C, H, W)
        pooled = torch.stack((flat.mean(1), flat.amax(1)), dim=1)  # (N, 2, H, W)
        a_spa = torch.sigmoid(self.conv(pooled))[:, None]  # (N, 1, 1, H, W)
        return a_spa * zt + z


class SpatioTemporalFusion(nn.Module):
    """f(z'_{t-1}, z_t) for one of ``FUSIONS``; ``out_channels`` tells the projection head its input."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"unknown fusion {kind!r}; choose one of {FUSIONS}")
        self.kind = kind
        self.stam = STAM() if kind == "stam" else None
        self.conv = nn.Conv2d(2 * channels, channels, 1) if kind == "conv1x1" else None
        self.out_channels = 2 * channels if kind in ("stam", "concat") else channels

    def forward(self, warped_prev: torch.Tensor | None, cur: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return cur
        if warped_prev is None:
            raise ValueError(f"fusion {self.kind!r} needs the warped previous features")
        if self.kind == "add":
            return warped_prev + cur
        pair = torch.cat((warped_prev, cur), dim=1)
        if self.kind == "concat":
            return pair
        if self.conv is not None:
            return self.conv(pair)
        assert self.stam is not None
        return self.stam(torch.stack((warped_prev, cur), dim=1)).flatten(1, 2)


class ProjectionHead(nn.Module):
    """Pixel-wise MLP (1x1 conv, ReLU, 1x1 conv) to a ``dim``-dimensional embedding (SimCLR style)."""

    def __init__(self, in_channels: int, dim: int = 64, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class STPLHeads(nn.Module):
    """Fusion block + projection head, owned by the STPL method (its ``aux_param_groups``)."""

    def __init__(self, fusion: str, feature_channels: int, dim: int = 64) -> None:
        super().__init__()
        self.fusion = SpatioTemporalFusion(fusion, feature_channels)
        self.projection = ProjectionHead(self.fusion.out_channels, dim)

    def forward(self, warped_prev: torch.Tensor | None, cur: torch.Tensor) -> torch.Tensor:
        return self.projection(self.fusion(warped_prev, cur))
