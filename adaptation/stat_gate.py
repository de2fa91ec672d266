"""Statistical gate decision: publish only when the lower confidence bound of the improvement clears a threshold.

Parent and candidate are scored on the same held-out clips, clip by clip; ``diffs[i]`` is the candidate's
score minus the parent's on clip ``i`` (per-clip mIoU with labeled validation clips, per-clip temporal
consistency as the unsupervised proxy: see ``adaptation.gate``). The mean of ``diffs`` estimates the
improvement; a percentile bootstrap over clips (``resamples`` resamples of the clips with replacement,
fixed ``seed``) gives a two-sided ``confidence`` interval for it. The candidate passes when the lower end
of that interval is >= ``threshold``. With a two-sided 95 % interval the lower end is a one-sided 97.5 %
lower bound: the risk of publishing a candidate whose true mean change is below ``threshold`` is about
2.5 %, *for the population of clips the held-out clips were drawn from*. Few clips, or clips that are
not independent (neighbouring chunks of one video), make the interval optimistic; at least 2 clips are
needed, with one the caller keeps a plain comparison. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    lower: float
    mean: float
    upper: float
    n_clips: int
    confidence: float
    resamples: int
    seed: int


@dataclass(frozen=True)
class StatDecision:
    passed: bool
    statistic: str  # what the per-clip differences measure, e.g. "miou" or "tc"
    threshold: float  # passed iff interval.lower >= threshold
    interval: Interval

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded to 4 decimals (the gate report's ``metrics["stat_gate"]``)."""
        iv = asdict(self.interval)
        for k in ("lower", "mean", "upper"):
            iv[k] = round(float(iv[k]), 4)
        return {"passed": self.passed, "statistic": self.statistic, "threshold": self.threshold, **iv,
                "rule": f"lower end of the {self.interval.confidence:.0%} percentile-bootstrap interval of the mean "
                        f"per-clip {self.statistic} change >= {self.threshold:g}"}


def _check(diffs: Sequence[float], confidence: float, resamples: int) -> np.ndarray:
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"the bootstrap needs at least 2 per-clip differences, got {d.size}")
    if not np.isfinite(d).all():
        raise ValueError("per-clip differences must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return d


def bootstrap_interval(diffs: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval:
    """Two-sided percentile-bootstrap ``confidence`` interval of the mean of ``diffs`` (deterministic per seed)."""
    d = _check(diffs, confidence, resamples)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(lower), float(d.mean()), float(upper), int(len(d)), float(confidence), int(resamples),
                    int(seed))


def bootstrap_lower_bound(diffs: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
                          resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> float:
    """The lower end of ``bootstrap_interval``."""
    return bootstrap_interval(diffs, confidence, resamples, seed).lower


def decide(diffs: Sequence[float], statistic: str, threshold: float = 0.0, confidence: float = DEFAULT_CONFIDENCE,
           resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> StatDecision:
    """Pass iff the lower bound of the mean per-clip change (candidate - parent) is >= ``threshold``."""
    interval = bootstrap_interval(diffs, confidence, resamples, seed)
    return StatDecision(interval.lower >= threshold, statistic, float(threshold), interval)
