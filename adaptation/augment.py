"""Cross-frame augmentation (TPS / STPL): photometric transforms drawn once and applied to every frame.

Frames are float RGB 0..255 tensors (N, 3, H, W). One parameter set is drawn per clip sample
(index n) and reused for frame t and frame t-1, so the optical flow between them stays valid.
Pure functions; randomness only comes from the ``torch.Generator`` passed in.

Note: TPS feeds mean-subtracted BGR floats to ``ToPILImage``, which wraps them modulo 256
(research report §2.2); here the transforms work on plain 0..255 RGB as the papers intend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges (ColorJitter-style factors in [1 - r, 1 + r]; hue as a fraction of a turn)."""

    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # pixels, at the model input size
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2


@dataclass
class AugmentParams:
    """Per-sample parameters; a blur sigma of 0 means no blur, factors of 1 / hue 0 mean no jitter."""

    blur_sigma: torch.Tensor  # (N,)
    brightness: torch.Tensor  # (N,)
    contrast: torch.Tensor  # (N,)
    saturation: torch.Tensor  # (N,)
    hue: torch.Tensor  # (N,)
    gray: torch.Tensor  # (N,) bool


def sample_params(n: int, cfg: AugmentConfig, generator: torch.Generator | None = None) -> AugmentParams:
    """Draw ``n`` parameter sets (on CPU)."""
    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def flip(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    blur_on, jitter_on = flip(cfg.blur_p), flip(cfg.jitter_p)
    one = torch.ones(n)
    return AugmentParams(
        blur_sigma=torch.where(blur_on, u(*cfg.blur_sigma), torch.zeros(n)),
        brightness=torch.where(jitter_on, u(1 - cfg.brightness, 1 + cfg.brightness), one),
        contrast=torch.where(jitter_on, u(1 - cfg.contrast, 1 + cfg.contrast), one),
        saturation=torch.where(jitter_on, u(1 - cfg.saturation, 1 + cfg.saturation), one),
        hue=torch.where(jitter_on, u(-cfg.hue, cfg.hue), torch.zeros(n)),
        gray=flip(cfg.gray_p),
    )


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_matrix(turn: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """3x3 RGB matrix rotating the hue by ``turn`` (fraction of 360 degrees) in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
    a = 2 * math.pi * turn
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]],
                       dtype=torch.float64)
    return (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(device=device, dtype=dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflect padding; identity for sigma <= 0."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(x.shape[-2:]) - 1))
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def apply_augment(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply parameters (sample n to image n): brightness, contrast, saturation, hue, grayscale, blur."""
    if x.shape[0] != params.brightness.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {params.brightness.shape[0]} parameter sets")
    out = []
    for i in range(x.shape[0]):
        img = x[i:i + 1].float()
        img = img * float(params.brightness[i])
        g = _gray(img)
        img = (img - g.mean()) * float(params.contrast[i]) + g.mean()
        g = _gray(img)
        img = g + (img - g) * float(params.saturation[i])
        if float(params.hue[i]) != 0.0:
            m = _hue_matrix(float(params.hue[i]), img.device, img.dtype)
            img = torch.einsum("ij,njhw->nihw", m, img)
        if bool(params.gray[i]):
            img = _gray(img).expand(-1, 3, -1, -1)
        img = img.clamp(0, 255)
        img = gaussian_blur(img, float(params.blur_sigma[i]))
        out.append(img)
    return torch.cat(out).to(x.dtype)


def cross_frame_augment(cur: torch.Tensor, prev: torch.Tensor, cfg: AugmentConfig = AugmentConfig(),
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, AugmentParams]:
    """Augment frame t and frame t-1 of each sample with the SAME drawn parameters."""
    if cur.shape != prev.shape:
        raise ValueError(f"frames differ in shape: {tuple(cur.shape)} vs {tuple(prev.shape)}")
    params = sample_params(cur.shape[0], cfg, generator)
    return apply_augment(cur, params), apply_augment(prev, params), params
