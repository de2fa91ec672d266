"""DeepLabV2 per-frame network: input normalisation, dilated backbone, ASPP-sum classifiers."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone
from .config import ModelConfig, Normalization


class ASPPClassifier(nn.Module):
    """DeepLabV2 "ASPP": parallel dilated 3x3 convs (with bias) mapping features to logits, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        convs = [nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates]
        for conv in convs:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            assert conv.bias is not None  # bias=True above
            nn.init.zeros_(conv.bias)
        self.conv2d_list = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class Normalize(nn.Module):
    """Maps float RGB 0..255 (N, 3, H, W) to the network's channel order, mean and std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, norm: Normalization) -> None:
        super().__init__()
        self.bgr = norm.channel_order == "BGR"
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x.flip(1)
        return (x - self.mean) / self.std


class DeepLabV2(nn.Module):
    """Per-frame segmentation network. Input: float RGB in 0..255. Output logits at 1/output_stride."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize(cfg.normalization)
        self.backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.width, cfg.caffe_stride)
        self.head = ASPPClassifier(self.backbone.out_channels, cfg.num_classes, cfg.aspp_rates)
        self.aux_head = (
            ASPPClassifier(self.backbone.aux_channels, cfg.num_classes, cfg.aspp_rates) if cfg.aux_head else None
        )

    @property
    def feature_channels(self) -> int:
        return int(self.backbone.out_channels)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> dict[str, torch.Tensor]:
        """Returns ``{"main": logits, "aux": logits (if aux head), "feat": last features (if asked)}``."""
        feats = self.backbone(self.normalize(x))
        out = {"main": self.head(feats["out"])}
        if self.aux_head is not None:
            out["aux"] = self.aux_head(feats["aux"])
        if with_features:
            out["feat"] = feats["out"]
        return out
