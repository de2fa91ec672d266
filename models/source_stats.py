"""Statistics of the source domain, stored next to a checkpoint's weights (``source_stats.safetensors``).

Recorded at training time (``adaptation.make_demo``, ``vss train``) or later from labeled data
(``vss import-davsn --stats-from``), so that source-free adaptation has a signal beyond the model's
own predictions without any source data (ActMAD-style feature alignment, spatial-prior and
prototype pseudo-labels; ``adaptation/methods/srcstats.py``), and so that routing and drift
detection can compare a stream with the source domain (``signature``, ``models/signature.py``).

Contents (``K`` classes, per summarised backbone layer ``L`` with ``C_L`` channels):

* ``feat_mean[L]``, ``feat_var[L]``: (C_L, rows, cols) mean and variance of the layer's output
  (after the model's input normalisation, eval-mode BatchNorm) over the pixels of each of
  ``grid`` = (rows, cols) image regions, pooled over all source frames;
* ``prior``: (K, ph, pw) p(class | position) on a ``ph × pw`` grid (sums to 1 over K, smoothed);
* ``class_freq``: (K,) the source pixel share of each class;
* ``prototypes``: (K, D) the mean last-layer feature of each class (zeros where unseen) and
  ``prototype_count`` (K,) how many feature pixels each mean is over;
* ``entropy``: the mean per-pixel prediction entropy (nats) of the model on the source frames;
* ``signature``, ``signature_std``: the mean and per-entry standard deviation of
  ``models.signature.frame_signature`` over the source frames (``signature_version`` its VERSION).

Pure data + (de)serialisation; no model code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATS = "source_stats.safetensors"
STATS_FORMAT = "vss-source-stats/1"


class SourceStatsError(ValueError):
    """A source statistics file is unreadable or inconsistent."""


@dataclass(eq=False)
class SourceStats:
    layers: tuple[str, ...]
    grid: tuple[int, int]
    feat_mean: dict[str, np.ndarray]
    feat_var: dict[str, np.ndarray]
    prior: np.ndarray
    class_freq: np.ndarray
    prototypes: np.ndarray
    prototype_count: np.ndarray
    entropy: float
    signature: np.ndarray
    signature_std: np.ndarray
    signature_version: int
    frames: int
    provenance: dict[str, str] = field(default_factory=dict)  # e.g. {"source": "adaptation.make_demo"}

    @property
    def num_classes(self) -> int:
        return int(self.prior.shape[0])

    def check(self) -> SourceStats:
        """Raise ``SourceStatsError`` when shapes disagree; returns self."""
        k = self.prior.shape[0]
        problems = []
        if self.prior.ndim != 3 or self.class_freq.shape != (k,) or self.prototypes.ndim != 2 \
                or self.prototypes.shape[0] != k or self.prototype_count.shape != (k,):
            problems.append(f"class tables disagree: prior {self.prior.shape}, class_freq {self.class_freq.shape}, "
                            f"prototypes {self.prototypes.shape}")
        for name in self.layers:
            m, v = self.feat_mean.get(name), self.feat_var.get(name)
            if m is None or v is None or m.shape != v.shape or m.shape[1:] != tuple(self.grid):
                problems.append(f"layer {name}: mean/var missing or not (C, {self.grid[0]}, {self.grid[1]})")
        if self.signature.shape != self.signature_std.shape or self.signature.ndim != 1:
            problems.append(f"signature {self.signature.shape} and its std {self.signature_std.shape} differ")
        if problems:
            raise SourceStatsError("; ".join(problems))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prior": self.prior, "class_freq": self.class_freq, "prototypes": self.prototypes,
               "prototype_count": self.prototype_count, "signature": self.signature,
               "signature_std": self.signature_std}
        for name in self.layers:
            out[f"mean/{name}"], out[f"var/{name}"] = self.feat_mean[name], self.feat_var[name]
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}

    def same_as(self, other: SourceStats) -> bool:
        """Exactly equal content (what a save/load round trip must keep)."""
        a, b = self.tensors(), other.tensors()
        return (self.header() == other.header() and a.keys() == b.keys()
                and all(torch.equal(a[k], b[k]) for k in a))

    def header(self) -> dict[str, str]:
        return {"format": STATS_FORMAT, "layers": json.dumps(list(self.layers)), "grid": json.dumps(list(self.grid)),
                "entropy": repr(float(self.entropy)), "signature_version": str(int(self.signature_version)),
                "frames": str(int(self.frames)), "provenance": json.dumps(self.provenance, sort_keys=True)}


def save_stats(stats: SourceStats, path: str | Path) -> None:
    """Write ``stats`` as safetensors (tensors + a string header in the file's metadata)."""
    stats.check()
    save_file(stats.tensors(), str(path), metadata=stats.header())


def load_stats(path: str | Path) -> SourceStats:
    """Read a file written by ``save_stats``; ``SourceStatsError`` names what is wrong."""
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise SourceStatsError(f"{path}: cannot read source statistics ({e})") from e
    if header.get("format") != STATS_FORMAT:
        raise SourceStatsError(f"{path}: not a {STATS_FORMAT} file (format {header.get('format')!r})")
    try:
        layers = tuple(json.loads(header["layers"]))
        arr = {k: v.numpy() for k, v in tensors.items()}
        stats = SourceStats(
            layers=layers, grid=tuple(json.loads(header["grid"])),
            feat_mean={n: arr[f"mean/{n}"] for n in layers}, feat_var={n: arr[f"var/{n}"] for n in layers},
            prior=arr["prior"], class_freq=arr["class_freq"], prototypes=arr["prototypes"],
            prototype_count=arr["prototype_count"], entropy=float(header["entropy"]),
            signature=arr["signature"], signature_std=arr["signature_std"],
            signature_version=int(header["signature_version"]), frames=int(header["frames"]),
            provenance=json.loads(header.get("provenance", "{}")))
    except (KeyError, ValueError, TypeError) as e:
        raise SourceStatsError(f"{path}: incomplete source statistics ({e})") from e
    return stats.check()
