"""Label maps: decoding the server's PNG and RLE encodings, colouring and overlay drawing (numpy + Pillow).

A label map is an (H, W) uint8 array of class indices; ``classes[i]`` names index ``i`` and
``palette[i]`` is its RGB colour (both come with every stream and every model description).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

RLE_HEADER = struct.Struct("<4sIII")  # b"RLE1", height, width, number of runs
RLE_MAGIC = b"RLE1"
IGNORE = 255  # "no label" in ground-truth maps; drawn transparent by ``overlay``


def decode_rle(blob: bytes) -> np.ndarray:
    """``b"RLE1"`` + uint32 LE height, width, n + n uint32 run lengths + n uint8 values -> (H, W) uint8."""
    if len(blob) < RLE_HEADER.size:
        raise ValueError("RLE message shorter than its 16-byte header")
    magic, h, w, n = RLE_HEADER.unpack_from(blob)
    if magic != RLE_MAGIC or len(blob) != RLE_HEADER.size + 5 * n:
        raise ValueError(f"malformed RLE message (magic {magic!r}, {n} runs, {len(blob)} bytes)")
    lengths = np.frombuffer(blob, "<u4", n, RLE_HEADER.size)
    values = np.frombuffer(blob, np.uint8, n, RLE_HEADER.size + 4 * n)
    if int(lengths.sum(dtype=np.int64)) != h * w:
        raise ValueError(f"RLE runs cover {int(lengths.sum(dtype=np.int64))} pixels, expected {h}x{w}")
    return np.repeat(values, lengths).reshape(h, w)


def encode_rle(labels: np.ndarray) -> bytes:
    """Inverse of ``decode_rle`` (the server's encoder; handy for tests and for storing label maps)."""
    h, w = labels.shape
    flat = np.ascontiguousarray(labels, dtype=np.uint8).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1)) if flat.size else np.zeros(0, int)
    lengths = np.diff(np.append(starts, flat.size)).astype("<u4")
    return RLE_HEADER.pack(RLE_MAGIC, h, w, len(starts)) + lengths.tobytes() + flat[starts].tobytes()


def decode_png(blob: bytes) -> np.ndarray:
    """A greyscale or palette PNG whose pixel values are class indices -> (H, W) uint8."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if img.format != "PNG" or img.mode not in ("L", "P"):
                raise ValueError(f"not a greyscale or palette PNG label map ({img.format} {img.mode})")
            return np.array(img, dtype=np.uint8)
    except (OSError, SyntaxError) as e:  # Pillow's "cannot identify image file" and friends
        raise ValueError(f"not a PNG label map: {e}") from e


def decode_labels(blob: bytes, fmt: str) -> np.ndarray:
    """A stream reply's binary message (``fmt`` is its ``format``: "png" or "rle") -> (H, W) uint8."""
    if fmt == "rle":
        return decode_rle(blob)
    if fmt == "png":
        return decode_png(blob)
    raise ValueError(f"unknown label-map format {fmt!r}; expected 'png' or 'rle'")


def _palette_array(palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    table[:len(colours)] = colours
    return table


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB in the palette's colours (unknown indices are black)."""
    return _palette_array(palette)[np.asarray(labels, dtype=np.uint8)]


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``(height, width)`` (never blends class indices)."""
    h, w = size
    if labels.shape == (h, w):
        return labels
    return np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize((w, h), Image.Resampling.NEAREST))


def overlay(frame: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured label map over an (H, W, 3) uint8 RGB frame; returns a new uint8 RGB array.

    ``labels`` is resized (nearest) to the frame's size when they differ; pixels labelled 255 (ignore)
    keep the frame's colour. ``alpha`` is the weight of the class colour, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be an (H, W, 3) uint8 RGB array, got {frame.dtype} {frame.shape}")
    labels = resize_labels(np.asarray(labels, np.uint8), frame.shape[:2])
    colours = colorize(labels, palette).astype(np.float32)
    blended = frame.astype(np.float32) * (1.0 - alpha) + colours * alpha
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    ignore = labels == IGNORE
    out[ignore] = frame[ignore]
    return out
