"""ACCEL-style video segmentation: one shared per-frame net on t and t-1, flow warp, 1x1 score fusion.

Streaming (one forward per frame, cached t-1 logits) is ``models.stream.stream_step`` over ``frame`` and ``fuse``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ModelConfig
from .deeplab import DeepLabV2
from .warp import warp

if TYPE_CHECKING:
    from .source_stats import SourceStats


class ScoreFusion(nn.Module):
    """1x1 conv over [current logits, warped previous logits] (2C -> C, no bias), identity-initialised.

    At initialisation the output equals the current frame's logits; the warped half has zero weight.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * num_classes, num_classes, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :num_classes, 0, 0] = torch.eye(num_classes)

    def forward(self, current: torch.Tensor, warped_previous: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((current, warped_previous), dim=1))


class AccelSegmenter(nn.Module):
    """ACCEL wrapper around a per-frame network. Stateless: streams keep their cached logits themselves.

    Frames are float RGB 0..255 (N, 3, H, W); flow is backward t->t-1, (N, 2, H, W), in pixels of the
    frame grid (it is resized and rescaled to logit resolution here).
    """

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.fusion = ScoreFusion(num_classes)
        self.num_classes = num_classes
        # Statistics of the source domain (``models.source_stats``): loaded with the checkpoint, carried
        # by copies (adapted candidates inherit them) and written by ``save_checkpoint``.
        self.source_stats: SourceStats | None = None

    def frame(self, x: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        """Per-frame network only: ``{"main", "aux"?, "feat"?}`` logits at 1/output_stride."""
        return self.net(x, with_features=with_features)

    def fuse(self, current: torch.Tensor, previous: torch.Tensor,
             flow: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp the t-1 logits to t and fuse. Returns (fused logits, validity mask of the warp)."""
        if flow is None:
            warped, valid = previous, torch.ones_like(previous[:, :1])
        else:
            warped, valid = warp(previous, flow)
        return self.fusion(current, warped), valid

    def forward(self, current: torch.Tensor, previous: torch.Tensor,
                flow: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Clip (training) entry point: frame t with gradients, frame t-1 without (as DA-VSN).

        Returns fused/current/previous logits for the main and (if present) aux heads, plus ``valid``.
        """
        cur = self.net(current)
        with torch.no_grad():
            prev = self.net(previous)
        out: dict[str, torch.Tensor] = {}
        for head in cur:
            out[f"fused_{head}" if head != "main" else "fused"], valid = self.fuse(cur[head], prev[head], flow)
            out[f"cur_{head}" if head != "main" else "cur"] = cur[head]
            out[f"prev_{head}" if head != "main" else "prev"] = prev[head]
        out["valid"] = valid
        return out


def build_model(cfg: ModelConfig) -> AccelSegmenter:
    """Build the ACCEL model for a configuration (random init)."""
    return AccelSegmenter(DeepLabV2(cfg), cfg.num_classes)
