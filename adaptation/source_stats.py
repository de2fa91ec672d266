"""Compute ``models.source_stats.SourceStats`` of a model on labeled source frames (pure: no I/O).

    stats = compute_source_stats(model, frames, labels)   # lists of (H, W, 3) uint8 and (H, W) int
    model.source_stats = stats                            # save_checkpoint then stores them

The model runs in eval mode (frozen BatchNorm statistics, as it is served); forward hooks on the
chosen backbone layers collect per-region sums of x and x² (``region_moments``), the labels give the
position prior, the class shares and the class prototypes of the last features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.classes import IGNORE_INDEX
from models.signature import VERSION as SIGNATURE_VERSION
from models.signature import frame_signature
from models.source_stats import SourceStats

from .clips import frames_tensor

GRID = (4, 8)  # regions (rows, cols) of the feature statistics
PRIOR_GRID = (16, 32)  # cells of the position prior
PRIOR_SMOOTHING = 1.0  # pseudo-count per class and cell (in frames)


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """Backbone layers summarised by default: a ResNet's four stages, else the whole-backbone outputs' modules."""
    backbone = cast(Any, model.net.backbone)  # type: ignore[union-attr]
    names = dict(backbone.named_children())
    stages = tuple(n for n in ("layer1", "layer2", "layer3", "layer4") if n in names)
    if stages:
        return stages
    last = len(backbone.features) - 1  # MobileNetV3: the aux stage and the last one
    return (f"features.{backbone.AUX_INDEX}", f"features.{last}")


def region_moments(x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> per-region means of x and x², each (N, C, rows, cols) (adaptive average pooling)."""
    return F.adaptive_avg_pool2d(x, grid), F.adaptive_avg_pool2d(x * x, grid)


@contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``outputs[layer]`` is the latest output of each named backbone module."""
    backbone = cast(nn.Module, model.net.backbone)  # type: ignore[union-attr]
    modules = dict(backbone.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"the backbone has no layers {missing}")
    outputs: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in layers]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def compute_source_stats(model: nn.Module, frames: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                         layers: Sequence[str] | None = None, grid: tuple[int, int] = GRID,
                         prior_grid: tuple[int, int] = PRIOR_GRID, batch: int = 4,
                         provenance: dict[str, str] | None = None) -> SourceStats:
    """Statistics of ``model`` on labeled frames (all of one size, the model's input size)."""
    if len(frames) == 0 or len(frames) != len(labels):
        raise ValueError(f"need labeled frames: {len(frames)} frames, {len(labels)} label maps")
    layers = tuple(layers) if layers is not None else default_layers(model)
    k = int(model.num_classes)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    s1: dict[str, torch.Tensor] = {}
    s2: dict[str, torch.Tensor] = {}
    prior = torch.zeros(k, *prior_grid, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64)
    proto = None
    proto_n = torch.zeros(k, dtype=torch.float64)
    entropy_sum = 0.0
    try:
        with capture(model, layers) as outputs:
            for i in range(0, len(frames), batch):
                x = frames_tensor(np.stack(frames[i:i + batch])).to(device)
                y = torch.from_numpy(np.stack(labels[i:i + batch]).astype(np.int64)).to(device)
                out = model.frame(x, with_features=True)  # type: ignore[operator]
                for name in layers:
                    m1, m2 = region_moments(outputs[name].double(), grid)
                    s1[name] = s1.get(name, 0) + m1.sum(0)
                    s2[name] = s2.get(name, 0) + m2.sum(0)
                logp = F.log_softmax(out["main"].double(), 1)
                entropy_sum += float(-(logp.exp() * logp).sum(1).mean(dim=(1, 2)).sum())
                valid = y != IGNORE_INDEX
                onehot = F.one_hot(torch.where(valid, y, 0), k).permute(0, 3, 1, 2).double() * valid[:, None]
                prior += F.adaptive_avg_pool2d(onehot, prior_grid).sum(0).cpu()
                counts += onehot.sum(dim=(0, 2, 3)).cpu()
                feat = out["feat"].double()
                small = F.interpolate(y[:, None].double(), size=feat.shape[-2:], mode="nearest")[:, 0].long()
                ok = small != IGNORE_INDEX
                fo = F.one_hot(torch.where(ok, small, 0), k).double() * ok[..., None]  # (N, h, w, K)
                sums = torch.einsum("nhwk,ndhw->kd", fo, feat).cpu()
                proto = sums if proto is None else proto + sums
                proto_n += fo.sum(dim=(0, 1, 2)).cpu()
    finally:
        model.train(was_training)
    n = len(frames)
    mean = {name: (s1[name] / n).cpu() for name in layers}
    var = {name: (s2[name] / n).cpu() - mean[name] ** 2 for name in layers}
    prior = (prior + PRIOR_SMOOTHING / k) / (n + PRIOR_SMOOTHING)
    prior = prior / prior.sum(0, keepdim=True)
    assert proto is not None
    sigs = np.stack([frame_signature(np.ascontiguousarray(f, dtype=np.uint8)) for f in frames])
    return SourceStats(
        layers=layers, grid=tuple(grid),  # type: ignore[arg-type]
        feat_mean={name: mean[name].float().numpy() for name in layers},
        feat_var={name: var[name].clamp_min(0).float().numpy() for name in layers},
        prior=prior.float().numpy(), class_freq=(counts / counts.sum().clamp_min(1)).float().numpy(),
        prototypes=(proto / proto_n.clamp_min(1)[:, None]).float().numpy(), prototype_count=proto_n.float().numpy(),
        entropy=entropy_sum / n, signature=sigs.mean(0).astype(np.float32),
        signature_std=sigs.std(0).astype(np.float32),
        signature_version=SIGNATURE_VERSION, frames=n, provenance=dict(provenance or {})).check()
