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

from ..contract import SourceFreeMethod
from ..ema import SafeguardConfig, Safeguards
from ..losses import itcr_loss, propagate, tent_loss
from ..options import PARAMS, SAFEGUARDS, Bool, Float
from ..trainer import LossOutput


class ITCR(SourceFreeMethod):
    name = "itcr"

    OPTIONS = {"aux_weight": Float(0.0, 100.0), "entropy_weight": Float(0.0, 100.0), "params": PARAMS,
               "bn_train": Bool(), **SAFEGUARDS}
    SAFEGUARD_DEFAULTS = SafeguardConfig(anchor_weight=0.1)

    def __init__(self, guard: Safeguards | None = None, aux_weight: float = 1.0, entropy_weight: float = 0.0,
                 params: str = "all", bn_train: bool = False, seed: int = 0) -> None:
        super().__init__(guard, params, bn_train, seed)
        self.aux_weight, self.entropy_weight = aux_weight, entropy_weight

    def trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in super().trainable(model) if not n.startswith("fusion")]

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
        return LossOutput(self.anchored(loss, logs, cur["main"], batch["cur"]), None, logs)
