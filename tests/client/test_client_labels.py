"""vss_client's label-map decoding agrees with the server's encoders; colouring and overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.classes import label_png
from service.stream_codec import encode_labels, encode_rle, raw_frame
from vss_client import colorize, decode_labels, decode_png, decode_rle, encode_frame, encode_rle as client_rle
from vss_client import overlay, resize_labels


@pytest.fixture()
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    out = rng.integers(0, 7, (37, 53), dtype=np.uint8)
    out[:10] = 3  # long runs as well as short ones
    out[-1, -5:] = 255
    return out


def test_decodes_what_the_server_encodes(labels: np.ndarray) -> None:
    assert np.array_equal(decode_rle(encode_rle(labels)), labels)
    assert client_rle(labels) == encode_rle(labels)
    assert np.array_equal(decode_labels(encode_labels(labels, "rle"), "rle"), labels)
    assert np.array_equal(decode_labels(encode_labels(labels, "png"), "png"), labels)
    palette = np.arange(21, dtype=np.uint8).reshape(7, 3)
    assert np.array_equal(decode_png(label_png(labels, palette)), labels)  # palette PNGs of zip results
    assert np.array_equal(decode_rle(encode_rle(np.zeros((0, 4), np.uint8))), np.zeros((0, 4), np.uint8))


def test_malformed_label_maps_are_value_errors(labels: np.ndarray) -> None:
    blob = encode_rle(labels)
    for bad in (blob[:10], blob[:-1], b"XXXX" + blob[4:]):
        with pytest.raises(ValueError, match="RLE"):
            decode_rle(bad)
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"\x89PNG\r\n\x1a\nbroken")
    rgb = io.BytesIO()
    Image.new("RGB", (4, 4)).save(rgb, "PNG")
    with pytest.raises(ValueError, match="greyscale or palette"):
        decode_png(rgb.getvalue())
    with pytest.raises(ValueError, match="unknown label-map format"):
        decode_labels(blob, "gif")


def test_colorize_and_overlay(labels: np.ndarray) -> None:
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    colours = colorize(labels, palette)
    assert colours.shape == (37, 53, 3) and list(colours[0, 0]) == [9, 9, 9]
    assert list(colours[-1, -1]) == [0, 0, 0]  # 255 is not in the palette
    frame = np.full((37, 53, 3), 100, np.uint8)
    assert np.array_equal(overlay(frame, labels, palette, 0.0), frame)
    full = overlay(frame, labels, palette, 1.0)
    assert list(full[0, 0]) == [9, 9, 9] and list(full[-1, -1]) == [100, 100, 100]  # ignore keeps the frame
    half = overlay(frame, labels, palette, 0.5)
    assert list(half[0, 0]) == [54, 54, 54]
    big = np.zeros((74, 106, 3), np.uint8)  # labels at half the frame's size are scaled up (nearest)
    assert overlay(big, labels, palette, 1.0).shape == (74, 106, 3)
    assert np.array_equal(resize_labels(labels, (74, 106))[::2, ::2], labels)
    with pytest.raises(ValueError, match="alpha"):
        overlay(frame, labels, palette, 1.5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        overlay(frame[..., 0], labels, palette)


def test_frames_are_sent_as_the_server_reads_them() -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    assert encode_frame(rgb) == raw_frame(rgb)
    assert encode_frame(Image.fromarray(rgb)) == raw_frame(rgb)
    assert encode_frame(b"\xff\xd8\xffjpeg") == b"\xff\xd8\xffjpeg"
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_frame(rgb.astype(np.float32))
