"""A cheap drift signal: how far the served predictions have moved from the active version's reference.

Per frame, from the fused logits at model resolution (already computed, no extra network work):
  * the mean per-pixel softmax entropy, normalised by log(C) to [0, 1] (``mean_entropy``);
  * the class distribution of the argmax labels (``class_shares``).
Each stream (websocket session) and the whole process keep an exponential moving average of both
(``Ema``, weight ``alpha`` per frame, so roughly the last 1/alpha frames count). The signal is, per
scope, ``entropy_delta`` = EMA entropy - reference entropy, and ``class_tv`` = the total variation
distance between the EMA class distribution and the reference one (``total_variation``, in [0, 1]).

Reference (the simplest honest choice, documented): the mean entropy and class distribution of the
first ``reference_frames`` frames this *process* serves with a version, over all streams. It is
re-learned after every swap and every restart, and it describes whatever traffic came first: if a
version's first frames are already shifted, drift is measured relative to that shifted traffic (and a
frame of the old version still in flight during a swap restarts it once more). A
reference stored in the checkpoint at training time (issue 13, item 4) would not have that weakness.
Until the reference is complete, the signal is ``None``. The signal only reports; nothing acts on it yet.

``signature_distance`` (per scope): the distance of the scope's moving-average domain signature
(``models.signature``, pixels only) to the base version's own signature, set by ``service.routing`` when
the base's signature is known and the stream's signature is computed (None otherwise; exported as
``vss_domain_distance`` by ``service.routing_metrics``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_REFERENCE_FRAMES = 50
DEFAULT_ALPHA = 0.05


def mean_entropy(logits: np.ndarray) -> float:
    """Mean softmax entropy over the pixels of (C, h, w) logits, divided by log(C): 0 = certain, 1 = uniform."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"expected (C, h, w) logits with C >= 2, got shape {x.shape}")
    z = x - x.max(axis=0, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=0, keepdims=True)
    p = e / s
    ent = np.log(s[0]) - (p * z).sum(axis=0)  # -sum p log p with log p = z - log s
    return float(ent.mean() / np.log(x.shape[0]))


def class_shares(logits: np.ndarray) -> np.ndarray:
    """(C,) share of the pixels whose argmax is each class."""
    labels = np.asarray(logits).argmax(axis=0)
    counts = np.bincount(labels.ravel(), minlength=logits.shape[0]).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def total_variation(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Total variation distance 0.5 * sum |p - q| between two distributions of the same length."""
    a, b = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"distributions of different lengths: {a.shape} vs {b.shape}")
    return 0.5 * float(np.abs(a - b).sum())


@dataclass
class Ema:
    """Exponential moving average of the entropy and the class distribution (starts at the first value)."""

    alpha: float = DEFAULT_ALPHA
    frames: int = 0
    entropy: float = 0.0
    shares: np.ndarray | None = None

    def update(self, entropy: float, shares: np.ndarray) -> None:
        if self.shares is None or len(self.shares) != len(shares):
            self.frames, self.entropy, self.shares = 0, entropy, shares.astype(np.float64)
        else:
            self.entropy += self.alpha * (entropy - self.entropy)
            self.shares = self.shares + self.alpha * (shares - self.shares)
        self.frames += 1


@dataclass
class Reference:
    """Running mean over the first ``target`` frames of one version."""

    version: str
    classes: list[str]
    target: int
    frames: int = 0
    entropy: float = 0.0
    shares: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def complete(self) -> bool:
        return self.frames >= self.target

    def add(self, entropy: float, shares: np.ndarray) -> None:
        if self.complete:
            return
        if self.frames == 0:
            self.shares = np.zeros(len(shares))
        self.frames += 1
        self.entropy += (entropy - self.entropy) / self.frames
        self.shares = self.shares + (shares - self.shares) / self.frames


def compare(ema: Ema, ref: Reference | None) -> dict[str, Any]:
    """The signal of one scope: its EMA, and its distance to the reference (None until that is complete)."""
    out: dict[str, Any] = {"frames": ema.frames, "entropy": None if ema.shares is None else round(ema.entropy, 4),
                           "entropy_delta": None, "class_tv": None}
    if ema.shares is not None and ref is not None and ref.complete and len(ref.shares) == len(ema.shares):
        out["entropy_delta"] = round(ema.entropy - ref.entropy, 4)
        out["class_tv"] = round(total_variation(ema.shares, ref.shares), 4)
    return out


class DriftMonitor:
    """Thread-safe drift state of one process: the reference, a process EMA and one EMA per open stream."""

    def __init__(self, reference_frames: int = DEFAULT_REFERENCE_FRAMES, alpha: float = DEFAULT_ALPHA) -> None:
        if reference_frames < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"need reference_frames >= 1 and 0 < alpha <= 1, got {reference_frames}, {alpha}")
        self.reference_frames, self.alpha = reference_frames, alpha
        self._lock = threading.Lock()
        self._ref: Reference | None = None
        self._process = Ema(alpha)
        self._streams: dict[str, Ema] = {}
        self._signature: dict[str | None, float] = {}  # scope (None: the process) -> signature distance to base
        self._opened = 0

    def open_stream(self, name: str | None = None) -> str:
        """Start tracking a stream; its id is ``name`` (e.g. ``source:<id>``) or ``s<n>`` (websockets)."""
        with self._lock:
            self._opened += 1
            sid = name if name is not None else f"s{self._opened}"
            self._streams[sid] = Ema(self.alpha)
            return sid

    def close_stream(self, sid: str) -> None:
        with self._lock:
            self._streams.pop(sid, None)
            self._signature.pop(sid, None)

    def set_signature_distance(self, sid: str | None, value: float | None) -> None:
        """Record the signature distance to the base of stream ``sid`` (None: the process)."""
        with self._lock:
            if value is None:
                self._signature.pop(sid, None)
            elif sid is None or sid in self._streams:
                self._signature[sid] = round(float(value), 4)

    def observe(self, sid: str | None, version: str, classes: Sequence[str], logits: np.ndarray) -> None:
        """Account one served frame of stream ``sid`` (None: not a stream) predicted by ``version``."""
        entropy, shares = mean_entropy(logits), class_shares(logits)
        with self._lock:
            if self._ref is None or self._ref.version != version:  # a new version: learn its reference afresh
                self._ref = Reference(version, list(classes), self.reference_frames)
                self._process = Ema(self.alpha)
                self._streams = {k: Ema(self.alpha) for k in self._streams}
            self._ref.add(entropy, shares)
            self._process.update(entropy, shares)
            if sid is not None and sid in self._streams:
                self._streams[sid].update(entropy, shares)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state (``GET /v1/models/active`` -> ``drift``)."""
        with self._lock:
            ref = self._ref
            reference = None if ref is None else {
                "version": ref.version, "frames": min(ref.frames, ref.target), "target_frames": ref.target,
                "complete": ref.complete, "entropy": round(ref.entropy, 4),
                "class_distribution": {n: round(float(v), 4) for n, v in zip(ref.classes, ref.shares)}}
            return {"reference": reference, "alpha": self.alpha,
                    "process": {**compare(self._process, ref), "signature_distance": self._signature.get(None)},
                    "streams": {sid: {**compare(ema, ref), "signature_distance": self._signature.get(sid)}
                                for sid, ema in self._streams.items()}}

