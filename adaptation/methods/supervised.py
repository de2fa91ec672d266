"""Source-only supervised training: CE on the fused main head + 0.1 x CE on the aux head (ADVENT/DA-VSN)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..contract import Method
from ..options import Float
from ..supervision import source_terms
from ..trainer import LossOutput


class SourceOnly(Method):
    """Batch: ``cur``, ``prev`` (N, 3, H, W) float RGB 0..255, ``flow`` (N, 2, H, W), ``label`` (N, H, W)."""

    name = "source-only"
    OPTIONS = {"aux_weight": Float(0.0, 100.0), "head_lr_mult": Float(0.0, 1000.0)}

    def __init__(self, aux_weight: float = 0.1, head_lr_mult: float = 10.0) -> None:
        self.aux_weight, self.head_lr_mult = aux_weight, head_lr_mult

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        heads = [p for n, p in model.named_parameters() if n.startswith(("net.head", "net.aux_head"))]
        fusion = list(model.fusion.parameters())
        backbone = [p for n, p in model.named_parameters() if n.startswith("net.backbone")]
        return [{"params": backbone, "lr_mult": 1.0},
                {"params": heads + fusion, "lr_mult": self.head_lr_mult}]

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        out = model(batch["cur"], batch["prev"], batch.get("flow"))
        loss, logs = source_terms(out, batch["label"], self.aux_weight)
        return LossOutput(loss, None, logs)
