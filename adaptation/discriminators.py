"""Output-space domain discriminators (DCGAN-style, as AdaptSegNet/ADVENT/DA-VSN).

``FCDiscriminator``: five 4x4 stride-2 convolutions in -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1 with
LeakyReLU(0.2) between them; the output is a patch map of raw logits at 1/32 of the input size.
Feed it softmax maps upsampled to the frame size (at least 32x32 so the patch map is not empty).
"""

from __future__ import annotations

import torch
from torch import nn


class FCDiscriminator(nn.Module):
    def __init__(self, in_channels: int, ndf: int = 64) -> None:
        super().__init__()
        widths = [in_channels, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"discriminator expects {self.in_channels} channels, got {x.shape[1]}")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"discriminator input {tuple(x.shape[-2:])} is smaller than 32x32")
        return self.layers(x)

    def conv_weights(self) -> list[torch.Tensor]:
        """The weight tensors of the five convolutions (for the weight-discrepancy loss)."""
        return [m.weight for m in self.layers if isinstance(m, nn.Conv2d)]


def set_requires_grad(modules: list[nn.Module] | tuple[nn.Module, ...], flag: bool) -> None:
    """Freeze/unfreeze discriminators around the generator's adversarial term (ADVENT style).

    Freezing keeps the generator's backward out of the discriminators (no wasted gradients, and no
    second gradient-ready event for DistributedDataParallel in the same step).
    """
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)
