"""Reference copies of the model used as safeguards: EMA teacher, frozen anchor, stochastic restore.

The helpers are pure-ish functions over modules (CoTTA's three ideas as named pieces rather than
inline blocks). ``Safeguards`` bundles them for a method: it is attached to the model at the start
of a run and updated by the method's ``after_step``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .losses import anchor_loss


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off (teacher or anchor)."""
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, copy_buffers: bool = True) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    With ``copy_buffers`` the BN running statistics are copied from the student, so a teacher kept in
    eval mode normalises with the statistics the student has gathered on the target domain
    (DESIGN §4: a teacher with source statistics gives poor pseudo-labels).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    for tp, sp in zip(teacher.parameters(), student.parameters(), strict=True):
        tp.mul_(momentum).add_(sp.detach(), alpha=1.0 - momentum)
    if copy_buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
            tb.copy_(sb)


@torch.no_grad()
def stochastic_restore(model: nn.Module, source: dict[str, torch.Tensor], p: float,
                       generator: torch.Generator | None = None, names: set[str] | None = None) -> int:
    """CoTTA: reset each element of the named parameters to its source value with probability ``p``.

    ``source`` maps parameter names to their source tensors; ``names`` restricts the restore to the
    parameters a method trains (default: all in ``source``). Returns how many elements were reset.
    """
    if p <= 0:
        return 0
    count = 0
    for name, param in model.named_parameters():
        if name not in source or (names is not None and name not in names):
            continue
        mask = torch.rand(param.shape, generator=generator) < p
        mask = mask.to(param.device)
        param.copy_(torch.where(mask, source[name].to(param.device, param.dtype), param))
        count += int(mask.sum())
    return count


@dataclass(frozen=True)
class SafeguardConfig:
    """Options every source-free method accepts (0 disables each one)."""

    ema_momentum: float = 0.0  # EMA teacher for pseudo-labels (e.g. 0.99); 0 = the student labels itself
    anchor_weight: float = 0.0  # weight of CE toward the frozen starting model's confident labels
    anchor_confidence: float = 0.9  # only pixels where the anchor's max probability reaches this
    restore_p: float = 0.0  # CoTTA stochastic restore probability per element and step (e.g. 0.01)


class Safeguards:
    """Teacher, anchor and restore state for one run; ``attach`` snapshots the starting model.

    The starting model is the parent, after the driver's BN-statistics pre-pass when one ran, so the
    teacher and the anchor both see target BN statistics.
    """

    def __init__(self, cfg: SafeguardConfig = SafeguardConfig(), seed: int = 0) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.teacher: nn.Module | None = None
        self.anchor: nn.Module | None = None
        self.source: dict[str, torch.Tensor] = {}
        self.names: set[str] = set()
        self.attached = False

    def attach(self, model: nn.Module, trainable: set[str], need_teacher: bool = False) -> None:
        """Snapshot the model once; later calls are no-ops. ``trainable``: names the method trains."""
        if self.attached:
            return
        self.attached = True
        self.names = set(trainable)
        if self.cfg.ema_momentum > 0 or need_teacher:
            self.teacher = frozen_copy(model)
        if self.cfg.anchor_weight > 0:
            self.anchor = frozen_copy(model)
        if self.cfg.restore_p > 0:
            self.source = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.names}

    def labeler(self, model: nn.Module) -> nn.Module:
        """The module that makes pseudo-labels: the EMA teacher if any, else the model itself."""
        return self.teacher if self.teacher is not None else model

    def anchor_term(self, logits: torch.Tensor, frames: torch.Tensor) -> torch.Tensor | None:
        """Weighted anchor CE for the current-frame logits of ``frames``; None when disabled."""
        if self.anchor is None:
            return None
        with torch.no_grad():
            ref = self.anchor.frame(frames)["main"]  # type: ignore[operator]
        return self.cfg.anchor_weight * anchor_loss(logits, ref, self.cfg.anchor_confidence)

    def after_step(self, model: nn.Module) -> None:
        """EMA update of the teacher, then stochastic restore of the trained parameters."""
        if self.teacher is not None:
            ema_update(self.teacher, model, self.cfg.ema_momentum)
        if self.cfg.restore_p > 0:
            stochastic_restore(model, self.source, self.cfg.restore_p, self.generator, self.names)
