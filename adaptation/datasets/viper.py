"""VIPER (source domain), laid out as the DA-VSN README says:

    ROOT/{split}/img/<seq3>/<seq3>_<frame5>.jpg   every frame
    ROOT/{split}/cls/<seq3>/<seq3>_<frame5>.png   palette PNG whose index is the VIPER class id; frames *0

Items are the labelled frames; the previous frame is frame - 1. VIPER ids map to the 15 DA-VSN/TPS
train ids (van and every other class -> ignore); the ego vehicle (the car component under the
bottom-centre pixel) is ignored. Precomputed flow: ``<seq>_<k5><k-1 as 5 digits>_int16_x10.npy``.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from models.classes import CLASS_SETS

from .base import (DatasetError, VideoFrameDataset, lookup_table, map_labels, read_index_png,
                   read_rgb, require_dir, require_file, resolve_flow_dir)

VIPER_TO_TRAIN = {3: 0, 4: 1, 9: 2, 11: 3, 13: 4, 14: 5, 7: 6, 8: 6, 6: 7, 2: 8, 20: 9, 24: 10, 27: 11, 26: 12,
                  23: 13, 22: 14}
VIPER_CAR = 24
_NAME_RE = re.compile(r"^(?P<seq>\d{3})_(?P<frame>\d{5})\.png$")


def remove_ego_vehicle(raw: np.ndarray, car_id: int = VIPER_CAR) -> np.ndarray:
    """Set the car component that contains the bottom-centre pixel (the ego vehicle) to 0 (unlabeled)."""
    h, w = raw.shape
    if raw[h - 1, w // 2] != car_id:
        return raw
    _, comp = cv2.connectedComponents((raw == car_id).astype(np.uint8), connectivity=8)
    out = raw.copy()
    out[comp == comp[h - 1, w // 2]] = 0
    return out


class Viper(VideoFrameDataset):
    name = "viper"
    classes = CLASS_SETS["viper"]

    def __init__(self, root: str | Path, split: str = "train", input_size: tuple[int, int] = (720, 1280),
                 flow: str = "precomputed", flow_dir: str | Path | None = None, extras: tuple[str, ...] = (),
                 labels: bool = True, native_labels: bool = False) -> None:
        super().__init__(input_size, flow, extras, labels, native_labels)
        self.root, self.split = Path(root), split
        self._table = lookup_table(VIPER_TO_TRAIN)
        self.image_dir = require_dir(self.root / split / "img", "VIPER image directory")
        self.label_dir = require_dir(self.root / split / "cls", "VIPER label directory")
        self.items = self._scan()
        self.flow_dir = None
        if flow == "precomputed":
            self.flow_dir = resolve_flow_dir(flow_dir, [self.root.parent / f"Estimated_optical_flow_Viper_{split}",
                                                        self.root / "optical_flow" / split], "VIPER")
        self._verify()

    def _scan(self) -> list[tuple[str, int, Path]]:
        items = []
        for path in sorted(self.label_dir.glob("*/*.png")):
            m = _NAME_RE.match(path.name)
            if m is None or m["seq"] != path.parent.name:
                raise DatasetError(f"unexpected label file name {path} (want <seq3>/<seq3>_<frame5>.png)")
            items.append((m["seq"], int(m["frame"]), path))
        if not items:
            raise DatasetError(f"no <seq>/<seq>_<frame>.png label files under {self.label_dir}")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def frame_path(self, index: int, which: str) -> Path:
        seq, k, _ = self.items[index]
        frame = k + {"cur": 0, "prev": -1, "prev2": -2, "next": 1}[which]
        if frame < 0:
            raise DatasetError(f"VIPER {seq}_{k:05d}: frame {which} would be {frame} (< 0)")
        return self.image_dir / seq / f"{seq}_{frame:05d}.jpg"

    def _flow_file(self, index: int, key: str) -> Path | None:
        seq, k, _ = self.items[index]
        a = k if key == "flow" else k - 1
        assert self.flow_dir is not None
        return self.flow_dir / f"{seq}_{a:05d}{a - 1:05d}_int16_x10.npy"

    def _verify(self) -> None:
        for i in range(len(self)):
            for which in self.frames_needed():
                require_file(self.frame_path(i, which), "VIPER frame")
            if self.flow_mode == "precomputed":
                for key in ("flow", "flow_prev") if "prev2" in self.extras else ("flow",):
                    require_file(self._flow_file(i, key), "precomputed flow file")

    def _raw_frame(self, index: int, which: str) -> np.ndarray:
        return read_rgb(self.frame_path(index, which))

    def _raw_labels(self, index: int) -> np.ndarray:
        raw = remove_ego_vehicle(read_index_png(self.items[index][2]))
        return map_labels(raw, self._table)
