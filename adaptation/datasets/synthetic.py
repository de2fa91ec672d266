"""The synthetic benchmark as a dataset: a fixed set of generated clips per split, deterministic by seed.

Clips come from ``adaptation.synth.generate_clip`` at the input size, so labels and the exact
(``gt``) backward flow need no resizing. Each split has its own seeds (derived from the style, the
split and ``seed``), so train and val never share a scene, and every run sees the same clips.
Items are frames 2 .. T-2 of every clip (so k-2 and k+1 exist for every item).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from .base import VideoFrameDataset

SPLIT_OFFSET = {"train": 0, "val": 500_000, "test": 900_000}


@functools.lru_cache(maxsize=64)
def cached_clip(style: str, frames: int, size: tuple[int, int], seed: int):
    """Generated clips are memoised per process: runs over the same data (the benchmark) render them once."""
    from adaptation import synth

    clip = synth.generate_clip(style=style, frames=frames, size=size, seed=seed)
    for a in (clip.frames, clip.labels, clip.flow):
        a.setflags(write=False)
    return clip


class SyntheticVideos(VideoFrameDataset):
    name = "synthetic"
    exact_flow = True

    def __init__(self, style: str = "source", split: str = "train", input_size: tuple[int, int] = (256, 512),
                 flow: str = "gt", extras: tuple[str, ...] = (), labels: bool = True, native_labels: bool = False,
                 clips: int | None = None, frames_per_clip: int = 12, seed: int = 0) -> None:
        from adaptation import synth

        super().__init__(input_size, "gt" if flow == "precomputed" else flow, extras, labels, native_labels)
        if split not in SPLIT_OFFSET:
            raise ValueError(f"unknown split {split!r} for synthetic data; choose one of {sorted(SPLIT_OFFSET)}")
        styles = list(synth.list_styles())
        if style not in styles:
            raise ValueError(f"unknown synthetic style {style!r}; choose one of {', '.join(styles)}")
        if frames_per_clip < 4:
            raise ValueError(f"frames_per_clip must be >= 4 (frames k-2..k+1 per item), got {frames_per_clip}")
        self.style, self.split = style, split
        self.classes = tuple(synth.CLASSES)
        self.num_clips = clips if clips is not None else (8 if split == "train" else 4)
        self.frames_per_clip = frames_per_clip
        # The style enters the seed so that source and target clips show different streets (unpaired domains).
        self.base_seed = seed * 7919 + SPLIT_OFFSET[split] + (zlib.crc32(style.encode()) % 1000) * 1000
        self.per_clip = frames_per_clip - 3

    def __len__(self) -> int:
        return self.num_clips * self.per_clip

    def _clip(self, index: int):
        return cached_clip(self.style, self.frames_per_clip, self.input_size, self.base_seed + index // self.per_clip)

    def _t(self, index: int) -> int:
        return 2 + index % self.per_clip

    def _raw_frame(self, index: int, which: str) -> np.ndarray:
        t = self._t(index) + {"cur": 0, "prev": -1, "prev2": -2, "next": 1}[which]
        return self._clip(index).frames[t]

    def _raw_labels(self, index: int) -> np.ndarray:
        return self._clip(index).labels[self._t(index)]

    def _exact_flow(self, index: int, key: str) -> np.ndarray | None:
        t = self._t(index)
        if key == "flow":
            return self._clip(index).flow[t]
        if key == "flow_prev":
            return self._clip(index).flow[t - 1]
        return None  # forward flows are not generated: DIS computes them
