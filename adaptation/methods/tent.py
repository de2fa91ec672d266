"""TENT (Wang et al., ICLR'21): minimise the prediction entropy, training only BatchNorm affine params.

BatchNorm runs in train mode, so it normalises with target batch statistics and its running
statistics move to the target domain (kept for inference). Loss: mean entropy of the fused ACCEL
prediction, plus an optional diversity term (negative entropy of the batch-mean prediction) that
penalises collapsing onto one class, plus the optional safeguards (anchor, EMA, restore).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..contract import SourceFreeMethod
from ..ema import Safeguards
from ..losses import diversity_loss, tent_loss
from ..options import PARAMS, SAFEGUARDS, Bool, Float
from ..trainer import LossOutput


class Tent(SourceFreeMethod):
    name = "tent"

    OPTIONS = {"diversity_weight": Float(0.0, 100.0), "params": PARAMS, "bn_train": Bool(), **SAFEGUARDS}

    def __init__(self, guard: Safeguards | None = None, diversity_weight: float = 0.0, params: str = "bn",
                 bn_train: bool = True, seed: int = 0) -> None:
        super().__init__(guard, params, bn_train, seed)
        self.diversity_weight = diversity_weight

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        out = model(batch["cur"], batch["prev"], batch.get("flow"))
        ent = tent_loss(out["fused"])
        loss, logs = ent, {"entropy": float(ent.detach())}
        if self.diversity_weight > 0:
            div = diversity_loss(out["fused"])
            loss = loss + self.diversity_weight * div
            logs["diversity"] = float(div.detach())
        return LossOutput(self.anchored(loss, logs, out["cur"], batch["cur"]), None, logs)
