"""Procedural driving-like videos with exact labels and exact backward optical flow, in several domains.

    clip = generate_clip("recolor", frames=16, size=(256, 512), seed=3)
    clip.frames  # (T, H, W, 3) uint8    clip.labels  # (T, H, W) uint8    clip.flow  # (T, H, W, 2) float32

See `styles` for the domains and `raycast` for how labels and flow are made exact.
"""

from .core import CLASSES, IGNORE_INDEX, PALETTE, Clip, colorize
from .generator import generate_clip
from .styles import STYLES, Style, list_styles

__all__ = ["CLASSES", "IGNORE_INDEX", "PALETTE", "STYLES", "Clip", "Style", "colorize", "generate_clip", "list_styles"]
