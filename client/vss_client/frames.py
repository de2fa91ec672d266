"""Frames for ``WS /v1/stream``: what the client sends for each frame it is given."""

from __future__ import annotations

import struct
from typing import Union

import numpy as np
from PIL import Image

RAW_HEADER = struct.Struct("<4sII")  # b"RGB3", width, height
RAW_MAGIC = b"RGB3"

#: A frame: encoded JPEG/PNG bytes (sent as they are), an (H, W, 3) uint8 RGB array, or a Pillow image.
Frame = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]


def raw_frame(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB array as a self-describing raw message (``b"RGB3"`` + width + height + pixels)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"a frame array must be (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    return RAW_HEADER.pack(RAW_MAGIC, w, h) + np.ascontiguousarray(rgb).tobytes()


def encode_frame(frame: Frame) -> bytes:
    """The binary message for one frame: bytes pass through (JPEG, PNG or raw with its header), arrays
    and Pillow images are sent as raw RGB (no lossy re-encoding)."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return bytes(frame)
    if isinstance(frame, Image.Image):
        return raw_frame(np.asarray(frame.convert("RGB")))
    if isinstance(frame, np.ndarray):
        return raw_frame(frame)
    raise TypeError(f"a frame must be bytes, a numpy RGB array or a PIL image, not {type(frame).__name__}")
