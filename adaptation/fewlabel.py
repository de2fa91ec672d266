"""A few labeled target frames as extra supervision inside the ONE training loop (``trainer.train``).

``labeled_frames(clips, k)`` picks ``k`` labeled frames evenly spread over labeled clips (the
``VSS_VAL_DIR`` clips the gate can use, ``service.worker.load_val_clips``). ``WithLabels`` wraps any
training method: every step it adds ``weight`` × the cross-entropy of the model's per-frame logits
on a random batch of those frames (horizontally flipped at random) to the method's own loss; every
other hook is the method's. The frames are small in number (K ≤ ``MAX_LABELED_FRAMES``), so they are
held as tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .clips import TargetClip, frames_tensor
from .contract import Method
from .supervision import segmentation_ce
from .trainer import LossOutput

MAX_LABELED_FRAMES = 4


def labeled_frames(clips: Sequence[TargetClip], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` (frames (k, H, W, 3) uint8, labels (k, H, W)) evenly spaced over the labeled clips' frames."""
    if not 1 <= k <= MAX_LABELED_FRAMES:
        raise ValueError(f"labeled frames must be between 1 and {MAX_LABELED_FRAMES}, got {k}")
    pool = [(c, t) for c in clips if c.labels is not None for t in range(len(c))]
    if len(pool) < k:
        raise ValueError(f"{k} labeled frames asked for, the labeled clips hold {len(pool)}")
    idx = np.linspace(0, len(pool) - 1, k).round().astype(int)
    frames = np.stack([pool[i][0].frames[pool[i][1]] for i in idx])
    labels = np.stack([pool[i][0].labels[pool[i][1]] for i in idx])
    return frames, labels


class WithLabels(Method):
    """``method`` plus ``weight`` × CE on labeled target frames, per step."""

    def __init__(self, method: Method, frames: np.ndarray, labels: np.ndarray, weight: float = 1.0,
                 batch_size: int = 2, seed: int = 0) -> None:
        if len(frames) == 0 or len(frames) != len(labels):
            raise ValueError(f"need labeled frames: {len(frames)} frames, {len(labels)} label maps")
        self.inner, self.weight, self.batch_size = method, weight, min(batch_size, len(frames))
        self.name = method.name  # type: ignore[misc]
        self.needs = method.needs
        self.frames = frames_tensor(np.asarray(frames))
        self.labels = torch.from_numpy(np.asarray(labels).astype(np.int64))
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(self.frames), generator=self.generator)[: self.batch_size]
        x, y = self.frames[idx], self.labels[idx]
        flip = torch.rand(len(idx), generator=self.generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        out = self.inner.loss(model, batch, step)
        x, y = self.batch(out.loss.device)
        ce = segmentation_ce(model.frame(x)["main"], y)  # type: ignore[operator]
        return LossOutput(out.loss + self.weight * ce, out.aux_loss, {**out.logs, "labeled_ce": float(ce.detach())})

    # every other hook is the wrapped method's
    def setup(self, model: nn.Module) -> None:
        self.inner.setup(model)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return self.inner.param_groups(model)

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return self.inner.aux_param_groups()

    def train_mode(self, model: nn.Module) -> None:
        self.inner.train_mode(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.inner.after_step(model, step)

    def finish(self, model: nn.Module) -> None:
        self.inner.finish(model)

    def modules(self) -> dict[str, nn.Module]:
        return self.inner.modules()

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.inner.distribute(wrap)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        self.inner.load_state_dict(state, model)
