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

from ..augment import AugmentConfig, cross_frame_augment
from ..ema import SafeguardConfig, Safeguards
from ..losses import cross_entropy_ignore, propagate, refine_pseudo_labels
from ..options import PARAMS, SAFEGUARDS, Bool, Choice, Float
from ..trainer import LossOutput
from .bn import select_params, set_bn_mode


class SelfTrain:
    name = "selftrain"

    OPTIONS = {"strategy": Choice("consistency", "max-confidence", "warp-frame"), "threshold": Float(0.0, 1.0),
               "aux_weight": Float(0.0, 100.0), "augment": Bool(), "params": PARAMS, "bn_train": Bool(),
               **SAFEGUARDS}

    def __init__(self, strategy: str = "consistency", threshold: float = 0.0, aux_weight: float = 0.1,
                 augment: bool = True, params: str = "all", bn_train: bool = False, ema_momentum: float = 0.99,
                 anchor_weight: float = 0.0, anchor_confidence: float = 0.9, restore_p: float = 0.0,
                 seed: int = 0) -> None:
        refine_pseudo_labels(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), torch.ones(1, 1, 1), strategy)
        self.strategy, self.threshold, self.aux_weight = strategy, threshold, aux_weight
        self.augment = AugmentConfig() if augment else None
        self.params, self.bn_train = params, bn_train
        self.generator = torch.Generator().manual_seed(seed)
        self.guard = Safeguards(SafeguardConfig(ema_momentum, anchor_weight, anchor_confidence, restore_p), seed)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        named = select_params(model, self.params)
        self.guard.attach(model, {n for n, _ in named})
        return [{"params": [p for _, p in named], "lr_mult": 1.0}]

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return []

    def train_mode(self, model: nn.Module) -> None:
        set_bn_mode(model, self.bn_train)

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
        loss, logs = ce, {"ce": float(ce.detach()), "pl_kept": float((labels != 255).float().mean())}
        if "fused_aux" in out and self.aux_weight > 0:
            ce_aux = cross_entropy_ignore(out["fused_aux"], labels)
            loss = loss + self.aux_weight * ce_aux
            logs["ce_aux"] = float(ce_aux.detach())
        anchor = self.guard.anchor_term(out["cur"], batch["cur"])
        if anchor is not None:
            loss = loss + anchor
            logs["anchor"] = float(anchor.detach())
        return LossOutput(loss, None, logs)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.guard.after_step(model)
