"""TENT (Wang et al., ICLR'21): minimise the prediction entropy, training only BatchNorm affine params.

BatchNorm runs in train mode, so it normalises with target batch statistics and its running
statistics move to the target domain (kept for inference). Loss: mean entropy of the fused ACCEL
prediction, plus an optional diversity term (negative entropy of the batch-mean prediction) that
penalises collapsing onto one class, plus the optional safeguards (anchor, EMA, restore).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..ema import SafeguardConfig, Safeguards
from ..losses import diversity_loss, tent_loss
from ..options import PARAMS, SAFEGUARDS, Bool, Float
from ..trainer import LossOutput
from .bn import select_params, set_bn_mode


class Tent:
    name = "tent"

    OPTIONS = {"diversity_weight": Float(0.0, 100.0), "params": PARAMS, "bn_train": Bool(), **SAFEGUARDS}

    def __init__(self, diversity_weight: float = 0.0, params: str = "bn", bn_train: bool = True,
                 ema_momentum: float = 0.0, anchor_weight: float = 0.0, anchor_confidence: float = 0.9,
                 restore_p: float = 0.0, seed: int = 0) -> None:
        self.diversity_weight, self.params, self.bn_train = diversity_weight, params, bn_train
        self.guard = Safeguards(SafeguardConfig(ema_momentum, anchor_weight, anchor_confidence, restore_p), seed)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        named = select_params(model, self.params)
        self.guard.attach(model, {n for n, _ in named})
        return [{"params": [p for _, p in named], "lr_mult": 1.0}]

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return []

    def train_mode(self, model: nn.Module) -> None:
        set_bn_mode(model, self.bn_train)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        out = model(batch["cur"], batch["prev"], batch.get("flow"))
        ent = tent_loss(out["fused"])
        loss, logs = ent, {"entropy": float(ent.detach())}
        if self.diversity_weight > 0:
            div = diversity_loss(out["fused"])
            loss = loss + self.diversity_weight * div
            logs["diversity"] = float(div.detach())
        anchor = self.guard.anchor_term(out["cur"], batch["cur"])
        if anchor is not None:
            loss = loss + anchor
            logs["anchor"] = float(anchor.detach())
        return LossOutput(loss, None, logs)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.guard.after_step(model)
