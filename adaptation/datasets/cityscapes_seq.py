"""Cityscapes-Seq (target domain), laid out as the DA-VSN README says:

    ROOT/leftImg8bit_sequence/{split}/<city>/<city>_<seq>_<frame6>_leftImg8bit.png   (30-frame snippets)
    ROOT/gtFine/{split}/<city>/<city>_<seq>_<frame6>_gtFine_labelIds.png            (the 20th frame)

Each item is a labelled frame k with frames k - prev_offset (and k - prev2_offset, k + 1 on request).
Raw Cityscapes ids are mapped to the label space of the source domain (``label_space``): the 15 VIPER
classes (rider merged into person, as DA-VSN/TPS), the 12 SYNTHIA classes, or the 19 standard ones.
Precomputed flow (DA-VSN naming, a flat directory): ``<city>_<seq>_<k6>_<k-1 as 6 digits>_int16_x10.npy``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from models.classes import CLASS_SETS

from .base import (DatasetError, VideoFrameDataset, lookup_table, map_labels, read_index_png, read_rgb,
                   require_dir, require_file, resolve_flow_dir)

# Raw Cityscapes label id -> train id, per label space (DA-VSN info_Viper.json / info_SynthiaSeq.json).
CS_TO_TRAIN: dict[str, dict[int, int]] = {
    "viper": {7: 0, 8: 1, 11: 2, 13: 3, 19: 4, 20: 5, 21: 6, 22: 7, 23: 8, 24: 9, 25: 9, 26: 10, 27: 11,
              28: 12, 32: 13, 33: 14},
    "synthia": {7: 0, 8: 1, 11: 2, 13: 3, 17: 4, 19: 5, 20: 6, 21: 7, 23: 8, 24: 9, 25: 10, 26: 11},
    "cityscapes": {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                   26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18},
}
EVAL_EXCLUDE = {"synthia": ("fence",)}  # DA-VSN/TPS evaluate SYNTHIA->Cityscapes on 11 classes
_LABEL_RE = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_gtFine_labelIds\.png$")


class CityscapesSeq(VideoFrameDataset):
    name = "cityscapes-seq"

    def __init__(self, root: str | Path, split: str = "train", label_space: str = "viper",
                 input_size: tuple[int, int] = (512, 1024), flow: str = "precomputed",
                 flow_dir: str | Path | None = None, extras: tuple[str, ...] = (), labels: bool = True,
                 native_labels: bool = False, prev_offset: int = 1, prev2_offset: int = 2) -> None:
        super().__init__(input_size, flow, extras, labels, native_labels)
        if label_space not in CS_TO_TRAIN:
            raise ValueError(f"unknown Cityscapes label space {label_space!r}; choose one of {sorted(CS_TO_TRAIN)}")
        if not 0 < prev_offset < prev2_offset:
            raise ValueError(f"need 0 < prev_offset < prev2_offset, got {prev_offset}, {prev2_offset}")
        self.root, self.split = Path(root), split
        self.classes = CLASS_SETS[label_space]
        self.eval_exclude = EVAL_EXCLUDE.get(label_space, ())
        self._table = lookup_table(CS_TO_TRAIN[label_space])
        self.offsets = {"cur": 0, "prev": -prev_offset, "prev2": -prev2_offset, "next": 1}
        self.image_dir = require_dir(self.root / "leftImg8bit_sequence" / split, "Cityscapes-Seq frame directory")
        self.label_dir = require_dir(self.root / "gtFine" / split, "Cityscapes gtFine directory")
        self.items = self._scan()
        self.flow_dir = None
        if flow == "precomputed":
            candidates = [self.root.parent / f"Estimated_optical_flow_Cityscapes-Seq_{split}",
                          self.root.parent / f"estimated_optical_flow_cityscapes_seq_{split}",
                          self.root / "optical_flow" / split]
            if split == "val":
                candidates.insert(0, self.root.parent / "Cityscapes_val_optical_flow_scale512")
            self.flow_dir = resolve_flow_dir(flow_dir, candidates, "Cityscapes-Seq")
        self._verify()

    def _scan(self) -> list[tuple[str, str, int, Path]]:
        items = []
        for path in sorted(self.label_dir.glob("*/*_gtFine_labelIds.png")):
            m = _LABEL_RE.match(path.name)
            if m is None or not path.name.startswith(path.parent.name + "_"):
                raise DatasetError(f"unexpected label file name {path} (want <city>_<seq6>_<frame6>_gtFine_"
                                   "labelIds.png inside its city folder)")
            items.append((m["city"], m["seq"], int(m["frame"]), path))
        if not items:
            raise DatasetError(f"no *_gtFine_labelIds.png files under {self.label_dir}/<city>/")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def frame_path(self, index: int, which: str) -> Path:
        city, seq, k, _ = self.items[index]
        frame = k + self.offsets[which]
        if frame < 0:
            raise DatasetError(f"frame {which} of {city}_{seq}_{k:06d} would be {frame} (< 0)")
        return self.image_dir / city / f"{city}_{seq}_{frame:06d}_leftImg8bit.png"

    def _flow_file(self, index: int, key: str) -> Path | None:
        city, seq, k, _ = self.items[index]
        a, b = ((k, k + self.offsets["prev"]) if key == "flow"
                else (k + self.offsets["prev"], k + self.offsets["prev2"]))
        assert self.flow_dir is not None
        return self.flow_dir / f"{city}_{seq}_{a:06d}_{b:06d}_int16_x10.npy"

    def _verify(self) -> None:
        """Every file the items will read exists (fail now, naming the first missing one)."""
        for i in range(len(self)):
            for which in self.frames_needed():
                require_file(self.frame_path(i, which), "Cityscapes-Seq frame")
            if self.flow_mode == "precomputed":
                for key in ("flow", "flow_prev") if "prev2" in self.extras else ("flow",):
                    require_file(self._flow_file(i, key), "precomputed flow file")

    def _raw_frame(self, index: int, which: str) -> np.ndarray:
        return read_rgb(self.frame_path(index, which))

    def _raw_labels(self, index: int) -> np.ndarray:
        return map_labels(read_index_png(self.items[index][3]), self._table)
