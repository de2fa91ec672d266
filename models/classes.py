"""Class sets and Cityscapes-style palettes for the label spaces vss knows."""

from __future__ import annotations

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
