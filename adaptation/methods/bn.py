"""BN-statistics adaptation (the parameter and BatchNorm policies shared by the methods: ``adaptation.params``).

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

from ..contract import Method
from ..options import Bool
from ..params import bn_affine_params, bn_layers, set_bn_mode
from ..trainer import LossOutput


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


class BNStats(Method):
    """BN-statistics adaptation on the loop: no gradient step, running stats re-estimated on target."""

    name = "bn"

    OPTIONS = {"reset": Bool()}  # what a request may set (adaptation.options)

    def __init__(self, reset: bool = True, seed: int = 0) -> None:
        self.reset = reset
        self._momenta: list[float | None] | None = None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # Declared with LR 0 so the loop has an optimiser; their gradient is always zero too.
        return [{"params": [p for _, p in bn_affine_params(model)], "lr_mult": 0.0}]

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

    def finish(self, model: nn.Module) -> None:
        """Restore the BN momenta changed by ``train_mode`` and leave the model in eval mode."""
        if self._momenta is not None:
            for m, mom in zip(bn_layers(model), self._momenta):
                m.momentum = mom
        self._momenta = None
        model.eval()
