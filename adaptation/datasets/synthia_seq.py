"""SYNTHIA-Seq SEQS-04-DAWN (source domain), laid out as DA-VSN expects:

    ROOT/SEQS-04-DAWN/rgb/<frame6>.png     every frame (one sequence, 000000-000849)
    ROOT/SEQS-04-DAWN/label/<frame6>.png   16-bit PNG with the SYNTHIA class id in the R channel

The bottom 120 of 760 rows (the ego car's bonnet) are cropped off every frame and label, as DA-VSN
(the same fraction at other resolutions). SYNTHIA ids map to the 12 DA-VSN/TPS train ids; "fence"
is trained but excluded from the mIoU. There is one sequence and no validation split, so every split
is the whole list. Precomputed flow: ``<k6>_int16_x10.npy`` holds the flow of frame k to k-1.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from models.classes import CLASS_SETS

from .base import (DatasetError, VideoFrameDataset, lookup_table, map_labels, read_rgb, require_dir,
                   require_file, resolve_flow_dir)

SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 5: 3, 7: 4, 15: 5, 9: 6, 6: 7, 1: 8, 10: 9, 11: 10, 8: 11}
KEEP_ROWS = 640 / 760  # DA-VSN: resize to 1280x760, crop the bottom 120 rows
SEQUENCE = "SEQS-04-DAWN"
_NAME_RE = re.compile(r"^\d{6}\.png$")


def keep_rows(height: int) -> int:
    return int(round(height * KEEP_ROWS))


def read_synthia_label(path: Path) -> np.ndarray:
    """Class ids from the R channel of a 16-bit SYNTHIA label PNG (a grey PNG is taken as ids)."""
    raw = cv2.imread(str(require_file(path, "SYNTHIA label")), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DatasetError(f"cannot decode label {path}")
    if raw.ndim == 3:
        if raw.shape[2] not in (3, 4):
            raise DatasetError(f"{path}: expected an RGB(A) label PNG, got {raw.shape[2]} channels")
        raw = raw[..., 2]  # OpenCV gives BGR(A): R is channel 2
    return raw.astype(np.int64)


class SynthiaSeq(VideoFrameDataset):
    name = "synthia-seq"
    classes = CLASS_SETS["synthia"]
    eval_exclude = ("fence",)

    def __init__(self, root: str | Path, split: str = "train", input_size: tuple[int, int] = (640, 1280),
                 flow: str = "precomputed", flow_dir: str | Path | None = None, extras: tuple[str, ...] = (),
                 labels: bool = True, native_labels: bool = False) -> None:
        super().__init__(input_size, flow, extras, labels, native_labels)
        self.root, self.split = Path(root), split
        self._table = lookup_table(SYNTHIA_TO_TRAIN, size=65536)
        seq = require_dir(self.root / SEQUENCE, "SYNTHIA-Seq sequence directory")
        self.image_dir = require_dir(seq / "rgb", "SYNTHIA-Seq rgb directory")
        self.label_dir = require_dir(seq / "label", "SYNTHIA-Seq label directory")
        self.items = self._scan()
        self.flow_dir = None
        if flow == "precomputed":
            self.flow_dir = resolve_flow_dir(flow_dir, [self.root.parent / "Estimated_optical_flow_SynthiaSeq_train",
                                                        self.root / "optical_flow"], "SYNTHIA-Seq")
        self._verify()

    def _scan(self) -> list[int]:
        labels = sorted(self.label_dir.glob("*.png"))
        bad = [p for p in labels if not _NAME_RE.match(p.name)]
        if bad:
            raise DatasetError(f"unexpected label file name {bad[0]} (want <frame6>.png)")
        frames = [int(p.stem) for p in self.image_dir.glob("*.png") if _NAME_RE.match(p.name)]
        if not labels or not frames:
            raise DatasetError(f"no <frame6>.png files under {self.label_dir if not labels else self.image_dir}")
        first, last = min(frames), max(frames)
        back = 2 if "prev2" in self.extras else 1
        ahead = 1 if "next" in self.extras else 0
        # Sequence boundaries only: a frame missing inside the sequence is an error (in _verify).
        return [k for k in (int(p.stem) for p in labels) if k - back >= first and k + ahead <= last]

    def __len__(self) -> int:
        return len(self.items)

    def frame_path(self, index: int, which: str) -> Path:
        k = self.items[index] + {"cur": 0, "prev": -1, "prev2": -2, "next": 1}[which]
        return self.image_dir / f"{k:06d}.png"

    def _flow_file(self, index: int, key: str) -> Path | None:
        k = self.items[index] - (0 if key == "flow" else 1)
        assert self.flow_dir is not None
        return self.flow_dir / f"{k:06d}_int16_x10.npy"

    def _verify(self) -> None:
        if not self.items:
            raise DatasetError(f"{self.label_dir}: no labelled frame has the neighbouring frames it needs")
        for i in range(len(self)):
            require_file(self.label_dir / f"{self.items[i]:06d}.png", "SYNTHIA label")
            for which in self.frames_needed():
                require_file(self.frame_path(i, which), "SYNTHIA-Seq frame")
            if self.flow_mode == "precomputed":
                for key in ("flow", "flow_prev") if "prev2" in self.extras else ("flow",):
                    require_file(self._flow_file(i, key), "precomputed flow file")

    def _raw_frame(self, index: int, which: str) -> np.ndarray:
        img = read_rgb(self.frame_path(index, which))
        return img[:keep_rows(img.shape[0])]

    def _raw_labels(self, index: int) -> np.ndarray:
        raw = read_synthia_label(self.label_dir / f"{self.items[index]:06d}.png")
        return map_labels(raw[:keep_rows(raw.shape[0])], self._table)

    def _crop_flow(self, flow: np.ndarray) -> np.ndarray:
        """Crop a flow field given for the full 760-row frame like the frames; keep an already cropped one.

        The research notes warn that DA-VSN's SYNTHIA flow seems to cover the full frame while the
        network sees the top 640 rows; we decide by the aspect ratio of the flow grid.
        """
        h, w = flow.shape[:2]
        full = abs(h / w - 760 / 1280) < abs(h / w - 640 / 1280)
        return flow[:keep_rows(h)] if full else flow
