"""The wire format of ``WS /v1/stream`` (see ``service.routes.stream``): config, frames, label maps.

Server side: ``parse_config``, ``precheck_frame`` (cheap header checks in the receiver: kind, size,
pixel count, before anything is decoded), ``decode_frame`` and ``encode_labels``. Client side (tests,
benchmarks, Python clients): ``raw_frame`` and ``decode_labels`` / ``decode_rle``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import cv2
import numpy as np

# Close codes (RFC 6455 section 7.4.1).
CLOSE_UNSUPPORTED = 1003  # unsupported data: text where a frame is expected, undecodable image
CLOSE_INVALID = 1007  # invalid payload: bad config, raw frame of the wrong size
CLOSE_POLICY = 1008  # policy violation: too many pixels (a frame, or the label maps of the config's size)
CLOSE_TOO_BIG = 1009  # message too big: over ws_max_message_bytes (uvicorn closes with it too, without a JSON error)
CLOSE_INTERNAL = 1011  # a server-side failure
CLOSE_TRY_AGAIN = 1013  # no model loaded yet

FORMATS = ("png", "rle")
CONFIG_KEYS = {"format", "size", "collect", "raw"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
RAW_HEADER = struct.Struct("<4sII")  # b"RGB3", width, height
RAW_MAGIC = b"RGB3"
RLE_HEADER = struct.Struct("<4sIII")  # b"RLE1", height, width, number of runs
RLE_MAGIC = b"RLE1"
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
MAX_LABEL_SIDE = 8192
MAX_CONFIG_CHARS = 4096  # a config is a few dozen characters; longer ones are refused before parsing



def close_reason(text: str, limit: int = 123) -> str:
    """``text`` cut to fit a websocket close frame: RFC 6455 allows 123 bytes of UTF-8 reason (a longer one
    makes the close itself fail, and the client sees 1006 instead of the code)."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")

class StreamError(Exception):
    """A protocol error: the server reports ``code``/``message`` and closes with ``close_code``."""

    def __init__(self, close_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.close_code, self.code, self.message = close_code, code, message


@dataclass(frozen=True)
class StreamConfig:
    format: str = "png"
    size: tuple[int, int] | None = None  # (h, w) of the label maps; None: each frame's size
    collect: bool = True
    raw: tuple[int, int] | None = None  # (h, w) of headerless RGB24 frames


def _invalid(message: str) -> StreamError:
    return StreamError(CLOSE_INVALID, "invalid_config", message)


def _positive_pair(value: object, what: str) -> tuple[int, int]:
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_LABEL_SIDE for v in value)):
        raise _invalid(f"{what} must be two integers in 1..{MAX_LABEL_SIDE}, got {value!r}")
    return int(value[0]), int(value[1])


def parse_config(message: dict[str, object], max_pixels: int) -> StreamConfig:
    """The first websocket message (an ASGI receive event) -> ``StreamConfig``; raises ``StreamError``.

    ``max_pixels`` bounds the raw frame size and the label maps of ``size`` (the request budget)."""
    text = message.get("text")
    if not isinstance(text, str):
        raise StreamError(CLOSE_UNSUPPORTED, "config_expected",
                          "the first message must be a text JSON config, e.g. {\"format\": \"png\"}")
    if len(text) > MAX_CONFIG_CHARS:
        raise _invalid(f"the config is {len(text)} characters long; at most {MAX_CONFIG_CHARS}")
    try:
        data = json.loads(text)
    except RecursionError as e:  # deeply nested arrays or objects
        raise _invalid("the config is nested too deeply") from e
    except ValueError as e:
        raise _invalid(f"the config is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise _invalid(f"the config must be a JSON object, got {type(data).__name__}")
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise _invalid(f"unknown config keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    fmt = data.get("format", "png")
    if fmt not in FORMATS:
        raise _invalid(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    size = None if data.get("size") is None else _positive_pair(data["size"], "size [h, w]")
    if size is not None and size[0] * size[1] > max_pixels:
        raise StreamError(CLOSE_POLICY, "too_many_pixels", f"label maps of {size[1]}x{size[0]} = "
                                                           f"{size[0] * size[1]} pixels are over the limit of "
                                                           f"{max_pixels} pixels")
    collect = data.get("collect", True)
    if not isinstance(collect, bool):
        raise _invalid(f"collect must be true or false, got {collect!r}")
    raw = None
    if data.get("raw") is not None:
        spec = data["raw"]
        if not isinstance(spec, dict) or set(spec) != {"width", "height"}:
            raise _invalid(f"raw must be {{\"width\": W, \"height\": H}}, got {spec!r}")
        h, w = _positive_pair([spec["height"], spec["width"]], "raw height and width")
        if h * w > max_pixels:
            raise StreamError(CLOSE_POLICY, "frame_too_large", f"raw frames of {w}x{h} are over the limit of "
                                                               f"{max_pixels} pixels")
        raw = (h, w)
    return StreamConfig(fmt, size, collect, raw)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(h, w) from the first SOF segment of a JPEG, or None if there is none before the scan."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan: no frame header came first
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_pixels(h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise StreamError(CLOSE_POLICY, "frame_too_large", f"a {w}x{h} frame is over the limit of {max_pixels} pixels")


def precheck_frame(data: bytes, config: StreamConfig, max_pixels: int) -> str:
    """Classify a binary frame message and check its declared size; returns "raw", "png" or "jpeg"."""
    if config.raw is not None:
        h, w = config.raw
        if len(data) != h * w * 3:
            raise StreamError(CLOSE_INVALID, "bad_raw_size", f"a raw frame of {len(data)} bytes; the config declared "
                                                             f"{w}x{h} RGB24 = {h * w * 3} bytes")
        return "raw"
    if data.startswith(RAW_MAGIC):
        if len(data) < RAW_HEADER.size:
            raise StreamError(CLOSE_INVALID, "bad_raw_size", "a raw frame shorter than its 12-byte header")
        _, w, h = RAW_HEADER.unpack_from(data)
        _check_pixels(h, w, max_pixels)
        if w == 0 or h == 0 or len(data) != RAW_HEADER.size + h * w * 3:
            raise StreamError(CLOSE_INVALID, "bad_raw_size", f"a raw {w}x{h} frame needs {RAW_HEADER.size} + "
                                                             f"{h * w * 3} bytes, got {len(data)}")
        return "raw"
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        _check_pixels(h, w, max_pixels)
        return "png"
    if data.startswith(JPEG_SOI):
        size = jpeg_size(data)
        if size is None:
            raise StreamError(CLOSE_UNSUPPORTED, "undecodable_frame", "a JPEG without a readable frame header")
        _check_pixels(*size, max_pixels)
        return "jpeg"
    raise StreamError(CLOSE_UNSUPPORTED, "unsupported_frame", "frames must be JPEG, PNG, or raw RGB24 (with the "
                                                              "b'RGB3' header, or of the config's raw size)")


def decode_frame(data: bytes, config: StreamConfig, max_pixels: int) -> np.ndarray:
    """A binary frame message -> (H, W, 3) uint8 RGB; raises ``StreamError``."""
    kind = precheck_frame(data, config, max_pixels)
    if kind == "raw":
        if config.raw is not None:
            h, w = config.raw
            return np.frombuffer(data, np.uint8).reshape(h, w, 3)
        _, w, h = RAW_HEADER.unpack_from(data)
        return np.frombuffer(data, np.uint8, offset=RAW_HEADER.size).reshape(h, w, 3)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3:
        raise StreamError(CLOSE_UNSUPPORTED, "undecodable_frame", f"the {kind.upper()} frame could not be decoded")
    _check_pixels(bgr.shape[0], bgr.shape[1], max_pixels)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def raw_frame(rgb: np.ndarray) -> bytes:
    """Client side: an (H, W, 3) uint8 RGB frame as a self-describing raw message (b"RGB3" header)."""
    h, w = rgb.shape[:2]
    return RAW_HEADER.pack(RAW_MAGIC, w, h) + np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()


def encode_rle(labels: np.ndarray) -> bytes:
    """(H, W) uint8 labels -> b"RLE1" + height, width, runs (uint32 LE) + run lengths + run values."""
    h, w = labels.shape
    flat = np.ascontiguousarray(labels, dtype=np.uint8).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1)) if flat.size else np.zeros(0, int)
    lengths = np.diff(np.append(starts, flat.size)).astype("<u4")
    return RLE_HEADER.pack(RLE_MAGIC, h, w, len(starts)) + lengths.tobytes() + flat[starts].tobytes()


def decode_rle(blob: bytes) -> np.ndarray:
    """Inverse of ``encode_rle``; raises ``ValueError`` for a malformed message."""
    if len(blob) < RLE_HEADER.size:
        raise ValueError("RLE message shorter than its 16-byte header")
    magic, h, w, n = RLE_HEADER.unpack_from(blob)
    if magic != RLE_MAGIC or len(blob) != RLE_HEADER.size + 5 * n:
        raise ValueError(f"malformed RLE message (magic {magic!r}, {n} runs, {len(blob)} bytes)")
    lengths = np.frombuffer(blob, "<u4", n, RLE_HEADER.size)
    values = np.frombuffer(blob, np.uint8, n, RLE_HEADER.size + 4 * n)
    if int(lengths.sum()) != h * w:
        raise ValueError(f"RLE runs cover {int(lengths.sum())} pixels, expected {h}x{w}")
    return np.repeat(values, lengths).reshape(h, w)


def encode_labels(labels: np.ndarray, fmt: str) -> bytes:
    """A label map as the reply's binary message: greyscale PNG or RLE."""
    if fmt == "rle":
        return encode_rle(labels)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(labels, dtype=np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of a label map failed")
    return png.tobytes()


def decode_labels(blob: bytes, fmt: str) -> np.ndarray:
    """Client side: a reply's binary message -> (H, W) uint8 labels."""
    if fmt == "rle":
        return decode_rle(blob)
    labels = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    if labels is None or labels.ndim != 2:
        raise ValueError("not a greyscale PNG label map")
    return labels
