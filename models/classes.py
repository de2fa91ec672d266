"""Class sets and Cityscapes-style palettes for the label spaces vss knows, and label maps as palette PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255  # label value of pixels without a class (void, dropped pseudo-labels); never a class id

CITYSCAPES_COLOURS: dict[str, tuple[int, int, int]] = {
    "road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70), "wall": (102, 102, 156),
    "fence": (190, 153, 153), "pole": (153, 153, 153), "light": (250, 170, 30), "sign": (220, 220, 0),
    "vegetation": (107, 142, 35), "terrain": (152, 251, 152), "sky": (70, 130, 180), "person": (220, 20, 60),
    "rider": (255, 0, 0), "car": (0, 0, 142), "truck": (0, 0, 70), "bus": (0, 60, 100), "train": (0, 80, 100),
    "motorcycle": (0, 0, 230), "bicycle": (119, 11, 32),
}

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "cityscapes": tuple(CITYSCAPES_COLOURS),
    # DA-VSN / TPS VIPER -> Cityscapes label space (15 train ids).
    "viper": ("road", "sidewalk", "building", "fence", "light", "sign", "vegetation", "terrain", "sky",
              "person", "car", "truck", "bus", "motorcycle", "bicycle"),
    # DA-VSN / TPS SYNTHIA-Seq -> Cityscapes (12 train ids; "fence" is trained but not evaluated).
    "synthia": ("road", "sidewalk", "building", "fence", "pole", "light", "sign", "vegetation", "sky",
                "person", "rider", "car"),
    # The synthetic benchmark of adaptation/synth.
    "synthetic": ("road", "sidewalk", "building", "vegetation", "sky", "person", "car"),
}


def palette_for(classes: tuple[str, ...] | list[str]) -> list[list[int]]:
    """Cityscapes colours for known class names, a deterministic colour otherwise."""
    out = []
    for i, name in enumerate(classes):
        colour = CITYSCAPES_COLOURS.get(name)
        out.append(list(colour) if colour else [(37 * i + 50) % 256, (91 * i + 120) % 256, (53 * i + 200) % 256])
    return out


def label_png(labels: np.ndarray, palette: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode an (H, W) uint8 label map as a palette-mode PNG (pixel value = class index)."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    image.putpalette(flat.ravel().tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label map PNG: palette mode (indices) or greyscale (values are class indices)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label PNGs must be palette or greyscale images, got mode {image.mode}")
        return np.asarray(image).astype(np.uint8)
