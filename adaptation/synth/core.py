"""Shared vocabulary of the generator: classes, palette, surface kinds and the `Clip` record."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from models.classes import IGNORE_INDEX as IGNORE_INDEX  # re-exported: adaptation.synth.IGNORE_INDEX

CLASSES: tuple[str, ...] = ("road", "sidewalk", "building", "vegetation", "sky", "person", "car")

PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35], [70, 130, 180], [220, 20, 60], [0, 0, 142]],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)


class Surface(IntEnum):
    """What a pixel shows, finer than a class: each surface has its own material in a style."""

    SKY = 0
    ROAD = 1
    SIDEWALK = 2
    VERGE = 3  # grass strip between sidewalk and facades; vegetation
    FACADE = 4  # front wall of the first building row
    SIDEWALL = 5  # side wall of a first-row building, seen through a gap
    BACKDROP = 6  # second building row behind the first
    HEDGE = 7
    CROWN = 8
    TRUNK = 9
    CAR_SIDE = 10
    CAR_END = 11  # front or back, carries the lights
    CAR_TOP = 12  # roof and bonnet
    CAR_GLASS = 13
    PERSON = 14
    HEAD = 15


N_SURFACES = len(Surface)

_CLASS_OF: dict[Surface, str] = {
    Surface.SKY: "sky", Surface.ROAD: "road", Surface.SIDEWALK: "sidewalk", Surface.VERGE: "vegetation",
    Surface.FACADE: "building", Surface.SIDEWALL: "building", Surface.BACKDROP: "building",
    Surface.HEDGE: "vegetation", Surface.CROWN: "vegetation", Surface.TRUNK: "vegetation",
    Surface.CAR_SIDE: "car", Surface.CAR_END: "car", Surface.CAR_TOP: "car", Surface.CAR_GLASS: "car",
    Surface.PERSON: "person", Surface.HEAD: "person",
}
SURFACE_LABEL = np.array([CLASSES.index(_CLASS_OF[s]) for s in Surface], dtype=np.uint8)
SURFACE_LABEL.setflags(write=False)


@dataclass(frozen=True)
class Clip:
    """A rendered clip.

    frames: (T, H, W, 3) uint8 RGB.
    labels: (T, H, W) uint8 class ids into `CLASSES` (`IGNORE_INDEX` is never produced).
    flow:   (T, H, W, 2) float32 backward flow in pixels: pixel (x, y) of frame t was at
            (x + flow[t, y, x, 0], y + flow[t, y, x, 1]) in frame t-1; flow[0] is zero.
    """

    frames: np.ndarray
    labels: np.ndarray
    flow: np.ndarray
    style: str
    seed: int


def colorize(labels: np.ndarray) -> np.ndarray:
    """Map class ids (any shape) to `PALETTE` colours; `IGNORE_INDEX` becomes black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(PALETTE)] = PALETTE
    return table[labels]
