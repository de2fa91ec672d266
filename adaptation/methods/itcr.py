"""I-TCR, source-free (DA-VSN §3.3): pull unconfident current predictions toward the confident,
flow-propagated prediction of the previous frame.

Per pixel where the warped t-1 prediction has lower entropy than the current one, L1 between the
softmax of the raw current logits and the warped t-1 softmax (main head, plus the aux head as in
DA-VSN, not down-weighted); gradients only through the current frame (see ``losses.itcr_loss``).

Alone, I-TCR is satisfied by any temporally consistent prediction, including a collapsed one, and
gives no signal where frames already agree. For stability the method adds, by option, a small
entropy term (TENT-like, ``entropy_weight``) and the anchor safeguard toward the starting model's
confident labels (``anchor_weight``, on by default). With an EMA teacher (``ema_momentum`` > 0)
the propagated t-1 prediction comes from the teacher instead of the student's no-grad pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ema import SafeguardConfig, Safeguards
from ..losses import itcr_loss, propagate, tent_loss
from ..options import PARAMS, SAFEGUARDS, Bool, Float
from ..trainer import LossOutput
from .bn import select_params, set_bn_mode


class ITCR:
    name = "itcr"

    OPTIONS = {"aux_weight": Float(0.0, 100.0), "entropy_weight": Float(0.0, 100.0), "params": PARAMS,
               "bn_train": Bool(), **SAFEGUARDS}

    def __init__(self, aux_weight: float = 1.0, entropy_weight: float = 0.0, params: str = "all",
                 bn_train: bool = False, ema_momentum: float = 0.0, anchor_weight: float = 0.1,
                 anchor_confidence: float = 0.9, restore_p: float = 0.0, seed: int = 0) -> None:
        self.aux_weight, self.entropy_weight = aux_weight, entropy_weight
        self.params, self.bn_train = params, bn_train
        self.guard = Safeguards(SafeguardConfig(ema_momentum, anchor_weight, anchor_confidence, restore_p), seed)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        named = [(n, p) for n, p in select_params(model, self.params) if not n.startswith("fusion")]
        self.guard.attach(model, {n for n, _ in named})
        return [{"params": [p for _, p in named], "lr_mult": 1.0}]

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return []

    def train_mode(self, model: nn.Module) -> None:
        set_bn_mode(model, self.bn_train)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        flow = batch.get("flow")
        cur = model.frame(batch["cur"])  # type: ignore[operator]
        with torch.no_grad():
            prev = self.guard.labeler(model).frame(batch["prev"])  # type: ignore[operator]
        loss = cur["main"].new_zeros(())
        logs: dict[str, float] = {}
        for head, weight in (("main", 1.0), ("aux", self.aux_weight)):
            if head not in cur or weight <= 0:
                continue
            probs, ent, valid = propagate(prev[head], flow)
            term = itcr_loss(cur[head], probs, ent, valid)
            loss = loss + weight * term
            logs[f"itcr_{head}"] = float(term.detach())
        if self.entropy_weight > 0:
            ent_term = tent_loss(cur["main"])
            loss = loss + self.entropy_weight * ent_term
            logs["entropy"] = float(ent_term.detach())
        anchor = self.guard.anchor_term(cur["main"], batch["cur"])
        if anchor is not None:
            loss = loss + anchor
            logs["anchor"] = float(anchor.detach())
        return LossOutput(loss, None, logs)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.guard.after_step(model)
