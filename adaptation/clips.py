"""Unlabeled target clips -> training batches for the source-free methods.

A ``TargetClip`` holds frames resized to the model input size, the backward flow between
consecutive frames at that size (given, or estimated with ``models.flow`` DIS), and optional labels
(for validation or the oracle only). ``PairSampler`` turns clips into the loop's batch dicts
(``cur``, ``prev``, ``flow`` float tensors; ``label`` when the clips carry labels) with random or
class-balanced sampling of (t-1, t) pairs. ``split_heldout`` keeps clips the gate can trust.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from models.flow import DISFlow, FlowProvider, resize_flow_np


@dataclass
class TargetClip:
    """Consecutive frames at the model input size. ``flows[t]`` maps t -> t-1 (``flows[0]`` is zero)."""

    frames: np.ndarray  # (T, h, w, 3) uint8 RGB
    flows: np.ndarray  # (T, h, w, 2) float32 backward, pixels of the (h, w) grid
    labels: np.ndarray | None = None  # (T, h, w) uint8, 255 = ignore

    def __post_init__(self) -> None:
        t, h, w = self.frames.shape[:3]
        if self.frames.ndim != 4 or self.frames.shape[3] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")
        if self.flows.shape != (t, h, w, 2):
            raise ValueError(f"flows must be {(t, h, w, 2)}, got {self.flows.shape}")
        if self.labels is not None and self.labels.shape != (t, h, w):
            raise ValueError(f"labels must be {(t, h, w)}, got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def slice(self, start: int, stop: int) -> TargetClip:
        """Frames [start, stop) as a new clip (the first frame's flow is zeroed: no predecessor)."""
        flows = self.flows[start:stop].copy()
        flows[0] = 0.0
        labels = None if self.labels is None else self.labels[start:stop]
        return TargetClip(self.frames[start:stop], flows, labels)


def _resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if frame.shape[:2] == (h, w):
        return np.ascontiguousarray(frame, dtype=np.uint8)
    interp = cv2.INTER_AREA if frame.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(frame), (w, h), interpolation=interp)


def prepare_clip(frames: Sequence[np.ndarray] | np.ndarray, input_size: tuple[int, int],
                 flows: np.ndarray | None = None, labels: np.ndarray | None = None,
                 flow_provider: FlowProvider | None = None) -> TargetClip:
    """Resize RGB frames (any size) to ``input_size`` = (h, w) and attach flow at that size.

    ``flows`` (T, H, W, 2) backward at the frames' original size is resized with its vectors scaled;
    without it, flow is estimated between consecutive resized frames (DIS by default). ``labels``
    (T, H, W) are resized by nearest neighbour.
    """
    if len(frames) < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {len(frames)}")
    small = np.stack([_resize_frame(np.asarray(f), input_size) for f in frames])
    h, w = input_size
    out_flows = np.zeros((len(small), h, w, 2), np.float32)
    if flows is not None:
        if len(flows) != len(small):
            raise ValueError(f"{len(small)} frames but {len(flows)} flow fields")
        for t in range(1, len(small)):
            out_flows[t] = resize_flow_np(np.asarray(flows[t], np.float32), (h, w))
    else:
        provider = flow_provider or DISFlow()
        for t in range(1, len(small)):
            f = provider(small[t - 1], small[t])
            if f is not None:
                out_flows[t] = resize_flow_np(f, (h, w))
    out_labels = None
    if labels is not None:
        if len(labels) != len(small):
            raise ValueError(f"{len(small)} frames but {len(labels)} label maps")
        out_labels = np.stack([cv2.resize(np.asarray(lab, np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                               for lab in labels])
    return TargetClip(small, out_flows, out_labels)


def chunk_clips(clips: Sequence[TargetClip], length: int) -> list[TargetClip]:
    """Cut clips into consecutive pieces of ``length`` frames (a remainder of >= 2 frames is kept)."""
    out = []
    for clip in clips:
        for start in range(0, len(clip), length):
            stop = min(start + length, len(clip))
            if stop - start >= 2:
                out.append(clip.slice(start, stop))
    return out


def split_heldout(clips: Sequence[TargetClip], fraction: float = 0.25,
                  chunk: int = 16) -> tuple[list[TargetClip], list[TargetClip]]:
    """(train, held-out) pieces: clips are cut into ``chunk``-frame pieces and every k-th piece,
    k = round(1 / fraction), is held out (the last of each group of k), so held-out frames come
    from every part of the input but are never trained on. A single piece is split in two halves.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    pieces = chunk_clips(clips, chunk)
    if not pieces:
        raise ValueError("no clip with at least 2 frames to split")
    if len(pieces) == 1:
        n = len(pieces[0])
        if n < 4:
            raise ValueError(f"need at least 4 frames to hold some out, got {n}")
        cut = n - max(2, int(round(n * fraction)))
        return [pieces[0].slice(0, cut)], [pieces[0].slice(cut, n)]
    k = max(2, int(round(1.0 / fraction)))
    held = [p for i, p in enumerate(pieces) if i % k == k - 1]
    if not held:
        held = [pieces[-1]]
    train = [p for p in pieces if not any(p is h for h in held)]
    return train, held


def data_sha256(clips: Sequence[TargetClip]) -> str:
    """sha256 over the frames (and labels) of the clips: identifies the adaptation data."""
    h = hashlib.sha256()
    for clip in clips:
        h.update(np.ascontiguousarray(clip.frames).tobytes())
        if clip.labels is not None:
            h.update(np.ascontiguousarray(clip.labels).tobytes())
    return h.hexdigest()


def frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 0..255."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


def class_balanced_weights(histograms: np.ndarray) -> np.ndarray:
    """Sampling weights for items with per-class pixel counts (P, C): each class gets equal total mass.

    An item's weight is sum_c counts[i, c] / total_c (its share of every class's pixels), so frames
    showing rare classes are drawn more often. Classes never predicted are ignored.
    """
    hist = np.asarray(histograms, np.float64)
    totals = hist.sum(0)
    present = totals > 0
    if not present.any():
        return np.full(len(hist), 1.0 / max(len(hist), 1))
    w = (hist[:, present] / totals[present]).sum(1)
    w = w + 1e-3 * w.mean()  # every pair keeps a small chance
    return w / w.sum()


class PairSampler:
    """Endless batches of (t-1, t) pairs from clips: ``{"cur", "prev", "flow"[, "label"], "index"}``.

    ``sampling``: ``random`` (uniform over pairs) or ``class-balanced`` (needs ``weights``, e.g. from
    ``class_balanced_weights`` over the parent's predicted class histograms of each pair). ``crop``
    takes random (h, w) crops (flow stays valid: it is translation invariant); ``flip`` mirrors a pair
    and negates dx. Deterministic for a given ``seed``.
    """

    def __init__(self, clips: Sequence[TargetClip], batch_size: int = 2, sampling: str = "random",
                 weights: np.ndarray | None = None, crop: tuple[int, int] | None = None, flip: bool = False,
                 seed: int = 0) -> None:
        if sampling not in ("random", "class-balanced"):
            raise ValueError(f"unknown sampling {sampling!r}; choose random or class-balanced")
        self.clips = list(clips)
        self.pairs = [(c, t) for c, clip in enumerate(self.clips) for t in range(1, len(clip))]
        if not self.pairs:
            raise ValueError("no (t-1, t) pair in the clips: every clip needs at least 2 frames")
        if sampling == "class-balanced":
            if weights is None or len(weights) != len(self.pairs):
                raise ValueError(f"class-balanced sampling needs one weight per pair ({len(self.pairs)})")
        self.weights = None if sampling == "random" else np.asarray(weights, np.float64) / np.sum(weights)
        self.batch_size, self.crop, self.flip = batch_size, crop, flip
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch()

    def batch(self) -> dict[str, Any]:
        idx = self.rng.choice(len(self.pairs), size=self.batch_size, p=self.weights)
        cur, prev, flow, label = [], [], [], []
        for i in idx:
            c, t = self.pairs[int(i)]
            clip = self.clips[c]
            parts = [clip.frames[t], clip.frames[t - 1], clip.flows[t]]
            if clip.labels is not None:
                parts.append(clip.labels[t])
            if self.crop is not None:
                h, w = clip.frames.shape[1:3]
                ch, cw = min(self.crop[0], h), min(self.crop[1], w)
                y, x = int(self.rng.integers(0, h - ch + 1)), int(self.rng.integers(0, w - cw + 1))
                parts = [p[y:y + ch, x:x + cw] for p in parts]
            if self.flip and self.rng.random() < 0.5:
                parts = [p[:, ::-1] for p in parts]
                parts[2] = parts[2] * np.array([-1.0, 1.0], np.float32)
            cur.append(parts[0]), prev.append(parts[1]), flow.append(parts[2])
            if clip.labels is not None:
                label.append(parts[3])
        batch: dict[str, Any] = {
            "cur": frames_tensor(np.stack(cur)),
            "prev": frames_tensor(np.stack(prev)),
            "flow": torch.from_numpy(np.ascontiguousarray(np.stack(flow))).permute(0, 3, 1, 2).float(),
            "index": torch.as_tensor(idx),
        }
        if len(label) == len(cur):
            batch["label"] = torch.from_numpy(np.stack(label).astype(np.int64))
        return batch

