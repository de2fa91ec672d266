"""Temporal pseudo-label self-training with an EMA teacher (UnifiedVideoDA §3.3 refinement, TPS style).

The teacher (EMA of the student, target BN statistics) predicts frame t and frame t-1; the t-1
prediction is warped to t by the flow and merged with the t prediction by a refinement strategy
(``consistency`` | ``max-confidence`` | ``warp-frame``, see ``losses.refine_pseudo_labels``). The
student sees the pair through cross-frame augmentation (same photometric draw on both frames, as
TPS) and is trained with CE on its fused output (+ ``aux_weight`` x CE on the fused aux head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.classes import IGNORE_INDEX

from ..augment import AugmentConfig, cross_frame_augment
from ..contract import SourceFreeMethod
from ..ema import SafeguardConfig, Safeguards
from ..losses import REFINEMENTS, cross_entropy_ignore, propagate, refine_pseudo_labels
from ..options import PARAMS, SAFEGUARDS, Bool, Choice, Float
from ..trainer import LossOutput


class SelfTrain(SourceFreeMethod):
    name = "selftrain"

    OPTIONS = {"strategy": Choice(*REFINEMENTS), "threshold": Float(0.0, 1.0),
               "aux_weight": Float(0.0, 100.0), "augment": Bool(), "params": PARAMS, "bn_train": Bool(),
               **SAFEGUARDS}
    SAFEGUARD_DEFAULTS = SafeguardConfig(ema_momentum=0.99)

    def __init__(self, guard: Safeguards | None = None, strategy: str = "consistency", threshold: float = 0.0,
                 aux_weight: float = 0.1, augment: bool = True, params: str = "all", bn_train: bool = False,
                 seed: int = 0) -> None:
        if strategy not in REFINEMENTS:
            raise ValueError(f"unknown refinement strategy {strategy!r}; choose consistency, max-confidence "
                             "or warp-frame")
        super().__init__(guard, params, bn_train, seed)
        self.strategy, self.threshold, self.aux_weight = strategy, threshold, aux_weight
        self.augment = AugmentConfig() if augment else None
        self.generator = torch.Generator().manual_seed(seed)

    def pseudo_labels(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Refined labels (N, h, w) at logit resolution from the labeler's t and warped t-1 predictions."""
        with torch.no_grad():
            n = batch["cur"].shape[0]
            logits = self.guard.labeler(model).frame(torch.cat((batch["cur"], batch["prev"])))["main"]
            cur_probs = logits[:n].float().softmax(1)
            prop_probs, _, valid = propagate(logits[n:], batch.get("flow"))
            return refine_pseudo_labels(cur_probs, prop_probs, valid, self.strategy, self.threshold)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        labels = self.pseudo_labels(model, batch)
        cur, prev = batch["cur"], batch["prev"]
        if self.augment is not None:
            cur, prev, _ = cross_frame_augment(cur, prev, self.augment, self.generator)
        out = model(cur, prev, batch.get("flow"))
        ce = cross_entropy_ignore(out["fused"], labels)
        loss, logs = ce, {"ce": float(ce.detach()), "pl_kept": float((labels != IGNORE_INDEX).float().mean())}
        if "fused_aux" in out and self.aux_weight > 0:
            ce_aux = cross_entropy_ignore(out["fused_aux"], labels)
            loss = loss + self.aux_weight * ce_aux
            logs["ce_aux"] = float(ce_aux.detach())
        return LossOutput(self.anchored(loss, logs, out["cur"], batch["cur"]), None, logs)
