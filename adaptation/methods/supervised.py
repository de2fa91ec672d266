"""Source-only supervised training: CE on the fused main head + 0.1 x CE on the aux head (ADVENT/DA-VSN)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..trainer import LossOutput

IGNORE_INDEX = 255


def segmentation_ce(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of stride-s logits upsampled (bilinear, align_corners=True) to the label size."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=True)
    return F.cross_entropy(logits, label.long(), ignore_index=ignore_index)


class SourceOnly:
    """Batch: ``cur``, ``prev`` (N, 3, H, W) float RGB 0..255, ``flow`` (N, 2, H, W), ``label`` (N, H, W)."""

    name = "source-only"

    def __init__(self, aux_weight: float = 0.1, head_lr_mult: float = 10.0) -> None:
        self.aux_weight, self.head_lr_mult = aux_weight, head_lr_mult

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        heads = [p for n, p in model.named_parameters() if n.startswith(("net.head", "net.aux_head"))]
        fusion = list(model.fusion.parameters())
        backbone = [p for n, p in model.named_parameters() if n.startswith("net.backbone")]
        return [{"params": backbone, "lr_mult": 1.0},
                {"params": heads + fusion, "lr_mult": self.head_lr_mult}]

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return []

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        out = model(batch["cur"], batch["prev"], batch.get("flow"))
        loss = segmentation_ce(out["fused"], batch["label"])
        logs = {"ce": float(loss.detach())}
        if "fused_aux" in out and self.aux_weight > 0:
            aux = segmentation_ce(out["fused_aux"], batch["label"])
            loss = loss + self.aux_weight * aux
            logs["ce_aux"] = float(aux.detach())
        return LossOutput(loss, None, logs)

    def after_step(self, model: nn.Module, step: int) -> None:
        return None
