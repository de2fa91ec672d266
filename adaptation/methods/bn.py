"""BN-statistics adaptation, plus the BatchNorm and parameter policies the source-free methods share.

``BNStats`` trains nothing: it re-estimates every BatchNorm layer's running mean/variance on target
frames as a cumulative average (``momentum=None``) from scratch. It runs on the shared loop by
returning a zero loss after a no-grad forward in BN-train mode (the optimiser sees zero gradients
on parameters it is told to update with LR 0). ``recalibrate_bn`` is the same thing as a plain
pre-pass, used by the source-free driver before the gradient methods (DESIGN §4: pseudo-labels
need target statistics).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..options import Bool
from ..trainer import LossOutput

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
PARAM_POLICIES = ("all", "backbone", "bn", "heads")


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def bn_affine_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named weight/bias of every BatchNorm layer (TENT's parameter set)."""
    names = {id(m) for m in bn_layers(model)}
    out = []
    for mod_name, mod in model.named_modules():
        if id(mod) in names:
            out += [(f"{mod_name}.{n}", p) for n, p in mod.named_parameters(recurse=False)]
    return out


def select_params(model: nn.Module, policy: str) -> list[tuple[str, nn.Parameter]]:
    """Named parameters a method trains: ``all`` (per-frame net + fusion), ``backbone`` (trunk only),
    ``heads`` (ASPP classifiers + fusion) or ``bn`` (BatchNorm affine only)."""
    if policy == "bn":
        return bn_affine_params(model)
    named = list(model.named_parameters())
    if policy == "all":
        return named
    if policy == "backbone":
        return [(n, p) for n, p in named if n.startswith("net.backbone")]
    if policy == "heads":
        return [(n, p) for n, p in named if not n.startswith("net.backbone")]
    raise ValueError(f"unknown parameter policy {policy!r}; choose one of {PARAM_POLICIES}")


def set_bn_mode(model: nn.Module, bn_train: bool) -> None:
    """Model in eval mode (no dropout etc.); BatchNorm layers in train mode iff ``bn_train``.

    In train mode BN normalises with batch statistics and updates its running statistics, which is
    what the model uses afterwards in eval mode (so TENT-style adaptation also moves the stats).
    """
    model.eval()
    for m in bn_layers(model):
        m.train(bn_train)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, frame_batches: Iterable[torch.Tensor], reset: bool = True) -> int:
    """Re-estimate BN running statistics as the cumulative average over ``frame_batches``.

    Each batch is (B, 3, H, W) float RGB 0..255 fed to ``model.frame``. The momenta are restored
    afterwards and the model is left in eval mode. Returns the number of batches used.
    """
    layers = bn_layers(model)
    saved = [m.momentum for m in layers]
    if reset:
        for m in layers:
            m.reset_running_stats()
    for m in layers:
        m.momentum = None
    set_bn_mode(model, True)
    n = 0
    try:
        for frames in frame_batches:
            model.frame(frames)  # type: ignore[operator]
            n += 1
    finally:
        for m, mom in zip(layers, saved):
            m.momentum = mom
        model.eval()
    return n


class BNStats:
    """BN-statistics adaptation on the loop: no gradient step, running stats re-estimated on target."""

    name = "bn"

    OPTIONS = {"reset": Bool()}  # what a request may set (adaptation.options)

    def __init__(self, reset: bool = True, seed: int = 0) -> None:
        self.reset = reset
        self._momenta: list[float | None] | None = None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # Declared with LR 0 so the loop has an optimiser; their gradient is always zero too.
        return [{"params": [p for _, p in bn_affine_params(model)], "lr_mult": 0.0}]

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return []

    def train_mode(self, model: nn.Module) -> None:
        layers = bn_layers(model)
        if self._momenta is None:
            self._momenta = [m.momentum for m in layers]
            if self.reset:
                for m in layers:
                    m.reset_running_stats()
        for m in layers:
            m.momentum = None  # cumulative average over every target batch seen
        set_bn_mode(model, True)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        with torch.no_grad():
            model.frame(torch.cat((batch["cur"], batch["prev"])))  # type: ignore[operator]
        zero = sum(p.sum() for _, p in bn_affine_params(model)) * 0.0
        return LossOutput(zero, None, {})

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def finish(self, model: nn.Module) -> None:
        """Restore the BN momenta changed by ``train_mode`` and leave the model in eval mode."""
        if self._momenta is not None:
            for m, mom in zip(bn_layers(model), self._momenta):
                m.momentum = mom
        self._momenta = None
        model.eval()
