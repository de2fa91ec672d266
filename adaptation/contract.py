"""The method contract: everything a driver (``trainer.train``, ``offline``, ``sourcefree``,
``distributed``) may call on a training method, with a default for every optional hook.

Lifecycle, in this order, once per run:

1. ``Cls.create(context, options)`` (or ``methods.build_method``): ``options`` are the method's
   declared ``OPTIONS`` (``adaptation.options``), checked before construction; ``context`` carries
   what the driver knows (seed, classes, steps).
2. ``setup(model)``: snapshot teachers/anchors, build the method's own modules. Called once, on the
   model as it is when training starts (after any BN pre-pass), before ``param_groups``.
3. ``param_groups(model)`` / ``aux_param_groups()``: what the optimisers train. Pure queries.
4. ``train_mode(model)``, then per step ``loss(model, batch, step)`` and ``after_step(model, step)``.
5. ``finish(model)``: undo run-only state (BN momenta); the model is left in eval mode by the caller.

Offline drivers also use ``modules()`` (saved, moved to device), ``distribute(wrap)`` (DDP),
``state_dict``/``load_state_dict`` (resume), ``aux_optimizer_options`` and ``needs`` (which frames
the datasets must provide: ``None`` for a method trained on flat labeled batches, a ``Needs`` for an
offline-UDA method, see ``UDAMethod``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from .ema import SafeguardConfig, Safeguards
from .options import SAFEGUARDS, Option, check_options
from .params import select_params, set_bn_mode
from .trainer import LossOutput


@dataclass(frozen=True)
class MethodContext:
    """What a driver tells every method at construction; each method uses what it needs."""

    seed: int = 0
    num_classes: int | None = None  # methods with discriminators need it
    aux_head: bool = True  # whether the model has an aux head (DA-VSN's aux adversarial pair)
    total_steps: int = 50_000  # schedules relative to the run length (I2VDA's proxy copy)


@dataclass(frozen=True)
class Needs:
    """Extra dataset items (``adaptation.datasets.base``) an offline-UDA method reads per domain."""

    source: tuple[str, ...] = ()
    target: tuple[str, ...] = ()


def from_text(declared: Mapping[str, Option], options: Mapping[str, Any]) -> dict[str, Any]:
    """Options typed on a command line: a string given for a declared bool/int/float option is parsed
    (``true``/``false`` in any case, numbers); everything else is left for ``check_options`` to judge."""
    out = dict(options)
    for name, value in options.items():
        kind = declared[name].kind if name in declared else None
        if not isinstance(value, str) or kind not in (bool, int, float):
            continue
        text = value.strip().lower()
        if kind is bool and text in ("true", "false"):
            out[name] = text == "true"
        elif kind is not bool:
            try:
                out[name] = kind(text)
            except ValueError:
                pass
    return out


def require_classes(method: str, context: MethodContext) -> int:
    """``context.num_classes``, which a method with discriminators cannot do without."""
    if context.num_classes is None:
        raise ValueError(f"method {method} needs the number of classes (num_classes)")
    return context.num_classes


class Method:
    """Base of every training method. Subclasses implement ``param_groups``, ``train_mode`` and ``loss``."""

    name: ClassVar[str]
    OPTIONS: ClassVar[Mapping[str, Option]] = {}  # what a caller may set (checked by ``create``)
    aux_optimizer_options: ClassVar[Mapping[str, Any]] = {}  # extra settings of the aux optimiser's groups
    needs: Needs | None = None  # None: flat labeled batches; a Needs: {"source": ..., "target": ...} batches

    @classmethod
    def create(cls, context: MethodContext, options: Mapping[str, Any]) -> Method:
        """The method with ``options`` checked against ``OPTIONS`` (``OptionError`` names a bad one)."""
        return cls._build(context, check_options(cls.name, cls.OPTIONS, options))

    @classmethod
    def _build(cls, context: MethodContext, options: dict[str, Any]) -> Method:
        return cls(**options)

    def setup(self, model: nn.Module) -> None:
        """Called once before ``param_groups``: snapshot the starting model, build own modules."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimiser groups for the model: ``{"params": [...], "lr_mult": float}``; nothing else is trained."""
        raise NotImplementedError

    def aux_param_groups(self) -> list[dict[str, Any]]:
        """Groups for the method's own modules (discriminators, projection heads); may be empty."""
        return []

    def train_mode(self, model: nn.Module) -> None:
        """Put the model (and own modules) in the mode this method trains in."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hook after the optimiser step (EMA teacher update, proxy copy, stochastic restore)."""

    def finish(self, model: nn.Module) -> None:
        """Hook after the last step: restore what ``train_mode`` changed beyond modes."""

    def modules(self) -> dict[str, nn.Module]:
        """The method's own stateful modules (saved with checkpoints, moved to the device)."""
        return {}

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the own modules' forwards through ``wrap`` (DistributedDataParallel)."""

    def state_dict(self) -> dict[str, Any]:
        """Non-module state to resume from (RNG states)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        """Restore ``state_dict()``; ``model`` lets a method rebuild copies before ``modules()`` are loaded."""


class UDAMethod(Method):
    """Offline unsupervised domain adaptation: batches ``{"source": labeled, "target": unlabeled}``.

    ``needs`` says which extra frames/flows each domain's dataset must provide.
    """

    needs: Needs = Needs()


class SourceFreeMethod(Method):
    """A method that adapts on unlabeled target pairs alone, with the shared safeguards injected.

    ``guard`` (teacher, anchor, restore; ``adaptation.ema.Safeguards``) is one object built from the
    safeguard options (defaults per method in ``SAFEGUARD_DEFAULTS``); the method asks it for the
    pseudo-labeler and adds ``anchored(...)`` to its loss.
    """

    SAFEGUARD_DEFAULTS: ClassVar[SafeguardConfig] = SafeguardConfig()

    def __init__(self, guard: Safeguards | None, params: str, bn_train: bool, seed: int) -> None:
        """``params``: the ``select_params`` policy; ``bn_train``: BatchNorm in train mode while training."""
        self.guard = guard if guard is not None else Safeguards(self.SAFEGUARD_DEFAULTS, seed)
        self.params, self.bn_train = params, bn_train

    @classmethod
    def _build(cls, context: MethodContext, options: dict[str, Any]) -> Method:
        own = {k: v for k, v in options.items() if k not in SAFEGUARDS}
        guard_cfg = replace(cls.SAFEGUARD_DEFAULTS, **{k: v for k, v in options.items() if k in SAFEGUARDS})
        return cls(guard=Safeguards(guard_cfg, context.seed), seed=context.seed, **own)

    def trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Named parameters this method trains (the ``params`` policy)."""
        return select_params(model, self.params)

    def setup(self, model: nn.Module) -> None:
        self.guard.attach(model, {n for n, _ in self.trainable(model)})

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in self.trainable(model)], "lr_mult": 1.0}]

    def train_mode(self, model: nn.Module) -> None:
        set_bn_mode(model, self.bn_train)

    def anchored(self, loss: torch.Tensor, logs: dict[str, float], logits: torch.Tensor,
                 frames: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the guard's anchor term for ``logits`` of ``frames`` (logged), if enabled."""
        anchor = self.guard.anchor_term(logits, frames)
        if anchor is None:
            return loss
        logs["anchor"] = float(anchor.detach())
        return loss + anchor

    def after_step(self, model: nn.Module, step: int) -> None:
        self.guard.after_step(model)

