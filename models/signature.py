"""Domain signature: a cheap, model-free description of what a camera's frames look like.

A signature is a short float vector computed from the pixels alone (no network), so that it costs
well under a millisecond per frame, can be computed the same way by a server on a streamed frame,
by the worker on a buffered clip and at training time on the source data, and does not change when
the model does. For one RGB uint8 frame, after an area resize to ``GRID`` (16×32):

* per horizontal band (``BANDS`` = 4, top to bottom) the mean and standard deviation of each channel
  in [0, 1] and the mean saturation (max − min over channels) — 28 values. Bands because driving
  scenes put sky, facades and road at different heights: a palette swap between classes
  (``recolor``) moves band colours and saturation even where the global mean stays; fog lowers
  contrast and lifts the mean, night lowers both;
* at ``DETAIL`` (128×256) grey: the mean absolute difference to a 3×3 median (sensor noise) and the
  share of Laplacian energy at full versus half resolution (sharpness: blur lowers it) — 2 values.

``clip_signature`` is the mean over frames. ``distance`` is the root-mean-square of the differences
divided by ``SCALE`` (the typical spread of each entry between frames of one domain), so distances are
in "within-domain standard deviations": on the synthetic styles, two 4-frame clips of one style and
different streets were ≤ 1.6 apart and clips of different styles ≥ 2.1 (source vs recolor; 4.4–7.9
for the other pairs). A stream's moving average and a version's mean over many clips vary less than
one 4-frame clip. ``tests/models/test_signature.py`` checks the separation.
Pure numpy + OpenCV, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np

GRID = (16, 32)  # (H, W) of the colour statistics
DETAIL = (128, 256)  # (H, W) of the noise and sharpness statistics
DETAIL_GAIN = 10.0
BANDS = 4
LENGTH = BANDS * 7 + 2
# Typical frame-to-frame spread of each entry within one domain (the pooled per-style standard deviation
# over 60 frames of each synthetic style at 128x256, rounded up to 0.01): distances are in these units.
SCALE = tuple([0.04, 0.03, 0.05, 0.02, 0.02, 0.02, 0.02] + [0.03, 0.03, 0.03, 0.02, 0.02, 0.02, 0.02]
              + [0.04, 0.03, 0.03, 0.02, 0.02, 0.02, 0.02] + [0.03, 0.03, 0.03, 0.03, 0.03, 0.02, 0.02]
              + [0.01, 0.01])
VERSION = 1  # bump when the definition changes: signatures of different versions are not comparable


def frame_signature(frame: np.ndarray) -> np.ndarray:
    """(LENGTH,) float32 signature of one (H, W, 3) uint8 RGB frame."""
    f = np.asarray(frame)
    if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {f.shape} {f.dtype}")
    small = cv2.resize(f, (GRID[1], GRID[0]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    values: list[float] = []
    for band in np.array_split(small, BANDS, axis=0):
        px = band.reshape(-1, 3)
        values += [*px.mean(axis=0), *px.std(axis=0), float((px.max(axis=1) - px.min(axis=1)).mean())]
    grey = cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (DETAIL[1], DETAIL[0]), interpolation=cv2.INTER_AREA)
    noise = float(np.abs(grey.astype(np.float32) - cv2.medianBlur(grey, 3)).mean()) / 255.0
    half = cv2.resize(grey, (DETAIL[1] // 2, DETAIL[0] // 2), interpolation=cv2.INTER_AREA).astype(np.float32)
    fine = float(np.abs(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F)).mean())
    coarse = float(np.abs(cv2.Laplacian(half, cv2.CV_32F)).mean())
    values += [min(noise * DETAIL_GAIN, 1.0), fine / (fine + coarse + 1e-6)]
    return np.asarray(values, dtype=np.float32)


def clip_signature(frames: Iterable[np.ndarray]) -> np.ndarray:
    """Mean signature of the frames of a clip (at least one)."""
    sigs = [frame_signature(f) for f in frames]
    if not sigs:
        raise ValueError("a clip signature needs at least one frame")
    return np.mean(sigs, axis=0).astype(np.float32)


def distance(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
             scale: Sequence[float] | np.ndarray | None = None) -> float:
    """Root-mean-square of the entry-wise differences divided by ``scale`` (default ``SCALE``)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    s = np.asarray(SCALE if scale is None else scale, dtype=np.float64)
    if x.shape != (LENGTH,) or y.shape != (LENGTH,) or s.shape != (LENGTH,):
        raise ValueError(f"signatures and scale must have {LENGTH} entries, got {x.shape}, {y.shape}, {s.shape}")
    if not (s > 0).all():
        raise ValueError("scale entries must be > 0")
    return float(np.sqrt(np.mean(((x - y) / s) ** 2)))


def nearest(query: Sequence[float] | np.ndarray,
            candidates: Mapping[str, Sequence[float] | np.ndarray]) -> tuple[str, float] | None:
    """The key of the candidate signature closest to ``query`` and its distance (None without candidates)."""
    best: tuple[str, float] | None = None
    for key, sig in candidates.items():
        d = distance(query, sig)
        if best is None or d < best[1]:
            best = (key, d)
    return best


class SignatureEma:
    """Exponential moving average of frame signatures (a stream's current signature)."""

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value: np.ndarray | None = None
        self.frames = 0

    def update(self, sig: np.ndarray) -> np.ndarray:
        s = np.asarray(sig, dtype=np.float32)
        self.value = s.copy() if self.value is None else (1 - self.alpha) * self.value + self.alpha * s
        self.frames += 1
        return self.value
