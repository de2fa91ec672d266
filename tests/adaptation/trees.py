"""Tiny fabricated dataset trees with the real file naming (64x128 frames), shared by the tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

H, W = 64, 128


def rgb(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    """A random RGB frame written with OpenCV (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)


def palette_png(path: Path, ids: np.ndarray) -> None:
    """A palette ('P' mode) PNG whose indices are the class ids, as the real label files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def flow_file(path: Path, value: float, size: tuple[int, int]) -> None:
    """A DA-VSN style int16 x10 flow file of constant ``value`` pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.full((*size, 2), int(value * 10), np.int16))


def make_cityscapes(base: Path) -> Path:
    """Cityscapes-Seq: frames 17-20 of one sequence per split, the 20th frame (000019) labeled."""
    root = base / "Cityscapes"
    for split in ("train", "val"):
        for f in (17, 18, 19, 20):
            rgb(root / "leftImg8bit_sequence" / split / "aachen" / f"aachen_000000_{f:06d}_leftImg8bit.png", f)
        ids = np.zeros((H, W), np.uint8)
        ids[:20], ids[20:40], ids[40:50, :64], ids[40:50, 64:] = 23, 7, 25, 26  # sky, road, rider, car; rest 0
        palette_png(root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", ids)
    flows = base / "Estimated_optical_flow_Cityscapes-Seq_train"
    flow_file(flows / "aachen_000000_000019_000018_int16_x10.npy", 1.0, (H // 2, W // 2))
    flow_file(flows / "aachen_000000_000018_000017_int16_x10.npy", -2.0, (H // 2, W // 2))
    return root


def make_viper(base: Path) -> Path:
    """VIPER: frames 8-10 of sequence 001, frame 10 labeled (with an ego vehicle and a van)."""
    root = base / "Viper"
    for f in (8, 9, 10):
        rgb(root / "train" / "img" / "001" / f"001_{f:05d}.jpg", f)
    ids = np.full((H, W), 3, np.uint8)  # road
    ids[:10] = 2  # sky
    ids[50:, 40:90] = 24  # ego car touching the bottom centre
    ids[20:30, 0:20] = 24  # another car
    ids[20:30, 100:120] = 25  # van -> ignore
    palette_png(root / "train" / "cls" / "001" / "001_00010.png", ids)
    flows = base / "Estimated_optical_flow_Viper_train"
    flow_file(flows / "001_0001000009_int16_x10.npy", 0.5, (H, W))
    flow_file(flows / "001_0000900008_int16_x10.npy", 0.5, (H, W))
    return root
