"""Shared machinery of the video datasets: item layout, image/label I/O, resizing and optical flow.

Every dataset item is a dict of tensors for ONE labelled frame k (``default_collate`` batches them):

    cur, prev        (3, H, W) float32 RGB 0..255, frames k and k-1, resized to ``input_size``
    flow             (2, H, W) float32 backward flow k -> k-1 (see ``models.warp``), pixels of the
                     input grid: pixel p of frame k was at p + flow(p) in frame k-1
    label            (H, W) int64 train ids, 255 = ignore (only when ``labels=True``)
    prev2, flow_prev frame k-2 and the flow k-1 -> k-2          (extra "prev2": TPS, DA-VSN, eval TC)
    next, flow_next  frame k+1 and the flow k -> k+1 (p of k was at p + flow_next(p) in k+1)  (extra "next")
    flow_fwd         flow k-1 -> k (p of k-1 was at p + flow_fwd(p) in k)  (extra "flow_fwd": I2VDA)
    index            (,) int64 item index

Flow sources (``flow=``): ``precomputed`` reads DA-VSN ``.npy`` files (int16, x10, backward,
usually half resolution; resized here with their vectors scaled); ``dis`` runs OpenCV DIS on the
resized frames; ``gt`` is the exact flow of the synthetic generator; ``none`` gives zero flow.
The DA-VSN files only hold backward flows k->k-1 (and k-1->k-2), so ``flow_next`` and ``flow_fwd``
are always computed with DIS unless the dataset has exact ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from models.classes import IGNORE_INDEX
from models.flow import DISFlow, load_davsn_flow, resize_flow_np
FLOW_MODES = ("precomputed", "dis", "gt", "none")
EXTRAS = ("prev2", "next", "flow_fwd")
# Which frame pair each flow key relates: (current, previous) in the backward sense of models.warp.
FLOW_PAIRS: dict[str, tuple[str, str]] = {
    "flow": ("cur", "prev"), "flow_prev": ("prev", "prev2"), "flow_next": ("cur", "next"), "flow_fwd": ("prev", "cur"),
}


class DatasetError(ValueError):
    """A dataset directory has the wrong layout or naming (the message names the offending path)."""


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise ``FileNotFoundError`` naming it."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (expected a directory)")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PNG/JPEG; a clear error for missing or unreadable files."""
    img = cv2.imread(str(require_file(path, "frame")), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot decode image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_index_png(path: Path) -> np.ndarray:
    """Raw values of a single-channel or palette PNG (the palette index, not its colour)."""
    from PIL import Image

    with Image.open(require_file(path, "label")) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{path}: expected a palette or grey label PNG, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Dense raw-id -> train-id table; unmapped ids go to IGNORE_INDEX."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for raw, train in mapping.items():
        table[raw] = train
    return table


def map_labels(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a lookup table; ids beyond it become IGNORE_INDEX."""
    out = np.full(raw.shape, IGNORE_INDEX, dtype=np.uint8)
    inside = (raw >= 0) & (raw < len(table))
    out[inside] = table[raw[inside]]
    return out


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize to ``size`` = (h, w) as DA-VSN (area when shrinking a lot, to avoid aliasing)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    shrink = img.shape[0] >= 2 * h and img.shape[1] >= 2 * w
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return np.clip(out, 0, 255).astype(np.uint8)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if labels.shape[:2] == (h, w):
        return labels
    return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


class VideoFrameDataset(Dataset):
    """Base class: subclasses list their items and implement the ``_raw_*`` readers.

    ``extras`` adds frames/flows (see the module docstring); ``labels=False`` drops labels (targets);
    ``native_labels=True`` keeps labels at dataset resolution (evaluation as DA-VSN, batch size 1).
    """

    name = "base"
    classes: tuple[str, ...] = ()
    eval_exclude: tuple[str, ...] = ()  # classes trained but left out of the mIoU (SYNTHIA: fence)
    exact_flow = False  # True where "gt" flow exists (synthetic)

    def __init__(self, input_size: tuple[int, int], flow: str = "precomputed", extras: tuple[str, ...] = (),
                 labels: bool = True, native_labels: bool = False) -> None:
        if flow not in FLOW_MODES:
            raise ValueError(f"unknown flow mode {flow!r}; choose one of {', '.join(FLOW_MODES)}")
        if flow == "gt" and not self.exact_flow:
            raise ValueError(f"--flow gt needs exact flow, which only the synthetic data has ({self.name} "
                             "has none); use precomputed or dis")
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown dataset extras {sorted(unknown)}; choose from {EXTRAS}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.flow_mode, self.extras = flow, tuple(extras)
        self.labels, self.native_labels = labels, native_labels
        self._dis: DISFlow | None = None

    # --- what subclasses provide ------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def _raw_frame(self, index: int, which: str) -> np.ndarray:
        """(H0, W0, 3) uint8 RGB of frame ``which`` in {cur, prev, prev2, next}, cropped as the dataset wants."""
        raise NotImplementedError

    def _raw_labels(self, index: int) -> np.ndarray:
        """(H0, W0) uint8 train ids with IGNORE_INDEX, on the grid of ``_raw_frame``."""
        raise NotImplementedError

    def _flow_file(self, index: int, key: str) -> Path | None:
        """Precomputed DA-VSN flow file for ``key`` in {flow, flow_prev}; None if the format has none."""
        return None

    def _crop_flow(self, flow: np.ndarray) -> np.ndarray:
        """Crop a precomputed flow like the frames were cropped (SYNTHIA); identity by default."""
        return flow

    def _exact_flow(self, index: int, key: str) -> np.ndarray | None:
        """Exact (H, W, 2) flow at the input size (synthetic); None where there is none."""
        return None

    # --- shared ---------------------------------------------------------------------------
    def frames_needed(self) -> tuple[str, ...]:
        names = ["cur", "prev"]
        if "prev2" in self.extras:
            names.append("prev2")
        if "next" in self.extras:
            names.append("next")
        return tuple(names)

    def flows_needed(self) -> tuple[str, ...]:
        keys = ["flow"]
        if "prev2" in self.extras:
            keys.append("flow_prev")
        if "next" in self.extras:
            keys.append("flow_next")
        if "flow_fwd" in self.extras:
            keys.append("flow_fwd")
        return tuple(keys)

    def _compute_flow(self, index: int, key: str, rgb: dict[str, np.ndarray]) -> np.ndarray:
        """(H, W, 2) float32 flow for ``key`` at the input size, from the configured source."""
        h, w = self.input_size
        if self.flow_mode == "none":
            return np.zeros((h, w, 2), np.float32)
        if self.flow_mode == "gt":
            exact = self._exact_flow(index, key)
            if exact is not None:
                return exact.astype(np.float32, copy=False)
        if self.flow_mode == "precomputed" and key in ("flow", "flow_prev"):
            path = self._flow_file(index, key)
            if path is not None:
                return resize_flow_np(self._crop_flow(load_davsn_flow(path)), (h, w))
        cur, prev = FLOW_PAIRS[key]
        if self._dis is None:
            self._dis = DISFlow()
        return self._dis(rgb[prev], rgb[cur])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        rgb = {name: resize_rgb(self._raw_frame(index, name), self.input_size) for name in self.frames_needed()}
        out: dict[str, Any] = {name: to_chw(img) for name, img in rgb.items()}
        for key in self.flows_needed():
            out[key] = torch.from_numpy(np.ascontiguousarray(self._compute_flow(index, key, rgb).transpose(2, 0, 1)))
        if self.labels:
            raw = self._raw_labels(index)
            lab = raw if self.native_labels else resize_labels(raw, self.input_size)
            out["label"] = torch.from_numpy(lab.astype(np.int64))
        out["index"] = torch.tensor(index, dtype=torch.int64)
        return out


def resolve_flow_dir(explicit: str | Path | None, candidates: list[Path], what: str) -> Path:
    """The directory of precomputed flow files: ``explicit`` if given, else the first existing candidate."""
    if explicit is not None:
        return require_dir(Path(explicit), f"{what} flow directory")
    for c in candidates:
        if c.is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no precomputed {what} flow directory found (tried {tried}); pass its path "
                            "with --source-flow-dir/--target-flow-dir, or use --flow dis")
