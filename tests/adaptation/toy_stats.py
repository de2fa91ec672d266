"""Source statistics of a (random) model on random labeled frames, for tests of methods that need them."""

from __future__ import annotations

import numpy as np
from torch import nn

from adaptation.source_stats import compute_source_stats
from models.source_stats import SourceStats


def toy_source_stats(model: nn.Module, size: tuple[int, int] = (32, 64), classes: int = 7) -> SourceStats:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, classes, size) for _ in range(2)]
    return compute_source_stats(model, frames, labels)
