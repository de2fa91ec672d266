"""The three outputs of a segmented video (sinks, written atomically: temp file + rename).

- ``zip``: one palette-mode PNG label map per frame (``000000.png`` ...) at the video's resolution,
  plus ``manifest.json`` (the summary: classes, palette, model version, fps, frame count ``frames``, and
  ``per_frame`` class shares);
- ``mp4``: the frames with the labels blended over them and a class legend (H.264);
- ``json``: ``{"summary": {...}, "frames": [{"index", "source_index", "class_fractions", "latency_ms"}]}``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from models.classes import label_png

from . import crashpoints
from .atomic import publish, temp_beside, write_atomic
from .stream_segmenter import FrameResult, overlay
from .video_io import VideoWriter

FORMATS = ("zip", "mp4", "json")
# x264 "veryfast" keeps ~30 MiB per 4K frame in flight (lookahead, B-frames, frame threads): 623 MiB for a
# 3840x2160 overlay, measured; "ultrafast" holds 185 MiB there. Frames over 1080p use it, so one upload's
# overlay fits the request budget (service/budget.py); 1080p "veryfast" holds 174 MiB.
FAST_PRESET_PIXELS = 1920 * 1088


def legend(classes: list[str], palette: np.ndarray, height: int) -> np.ndarray:
    """An RGB swatch + name list of the classes, scaled to a frame of ``height`` pixels."""
    scale = float(np.clip(height / 720.0, 0.65, 1.5))
    row = max(int(26 * scale), 8)
    font_scale, thick = 0.6 * scale, max(int(round(1.5 * scale)), 1)
    widths = [cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)[0][0] for name in classes]
    pad = max(row // 4, 2)
    box = np.full((row * len(classes) + 2 * pad, row + 3 * pad + max(widths, default=0), 3), 24, np.uint8)
    for i, (name, colour) in enumerate(zip(classes, palette)):
        y = pad + i * row
        cv2.rectangle(box, (pad, y + 2), (pad + row - 4, y + row - 2), tuple(int(c) for c in colour), -1)
        cv2.putText(box, name, (2 * pad + row, y + int(row * 0.72)), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), thick, cv2.LINE_AA)
    return box


class Sink(Protocol):
    def add(self, frame: np.ndarray, result: FrameResult) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...
    def abort(self) -> None: ...


class ZipSink:
    """Palette PNGs + manifest.json in a zip (PNGs are stored, not deflated again)."""

    def __init__(self, path: Path, classes: list[str], palette: np.ndarray) -> None:
        self.path, self.palette, self.classes = path, palette, classes
        self.tmp = temp_beside(path, ".part")
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)
        self.frames: list[dict[str, Any]] = []

    def add(self, frame: np.ndarray, result: FrameResult) -> None:
        name = f"{result.index:06d}.png"
        self.zip.writestr(name, label_png(result.labels, self.palette))
        self.frames.append({"file": name, "index": result.index, "class_fractions": result.class_fractions})

    def finish(self, summary: dict[str, Any]) -> None:
        for entry in self.frames:
            entry["source_index"] = entry["index"] * int(summary.get("stride", 1))
        manifest = {**summary, "classes": self.classes, "palette": self.palette.tolist(), "per_frame": self.frames}
        self.zip.writestr("manifest.json", json.dumps(manifest, indent=1), compress_type=zipfile.ZIP_DEFLATED)
        self.zip.close()
        crashpoints.reached("result_write")
        publish(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the partial file; never raises (closing a zip on a full disk fails writing its directory)."""
        try:
            self.zip.close()
        except (OSError, ValueError):
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


class Mp4Sink:
    """Overlay video with a class legend in the top-left corner, at the video's resolution."""

    def __init__(self, path: Path, classes: list[str], palette: np.ndarray, fps: float) -> None:
        self.path, self.classes, self.palette, self.fps = path, classes, palette, fps
        self.writer: VideoWriter | None = None
        self.legend: np.ndarray | None = None

    def add(self, frame: np.ndarray, result: FrameResult) -> None:
        h, w = frame.shape[:2]
        if self.writer is None:
            preset = "veryfast" if h * w <= FAST_PRESET_PIXELS else "ultrafast"
            self.writer = VideoWriter(self.path, self.fps, w, h, preset=preset)
            self.legend = legend(self.classes, self.palette, h)
        out = overlay(frame, result.labels, self.palette)
        assert self.legend is not None
        lh, lw = min(self.legend.shape[0], h), min(self.legend.shape[1], w)
        out[:lh, :lw] = self.legend[:lh, :lw]
        self.writer.write(out)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class JsonSink:
    """Per-frame class shares plus a summary, one JSON document."""

    def __init__(self, path: Path, classes: list[str], palette: np.ndarray) -> None:
        self.path, self.classes, self.palette = path, classes, palette
        self.frames: list[dict[str, Any]] = []

    def add(self, frame: np.ndarray, result: FrameResult) -> None:
        self.frames.append({"index": result.index, "class_fractions": result.class_fractions,
                            "latency_ms": round(result.latency_ms, 2)})

    def finish(self, summary: dict[str, Any]) -> None:
        for entry in self.frames:
            entry["source_index"] = entry["index"] * int(summary.get("stride", 1))
        doc = {"summary": {**summary, "classes": self.classes, "palette": self.palette.tolist()},
               "frames": self.frames}
        write_atomic(self.path, json.dumps(doc, indent=1).encode())

    def abort(self) -> None:
        pass  # nothing is on disk before finish()


def make_sink(fmt: str, path: Path, classes: list[str], palette: np.ndarray, fps: float) -> Sink:
    """The sink that writes an output format (``FORMATS``) to ``path``."""
    if fmt == "zip":
        return ZipSink(path, classes, palette)
    if fmt == "mp4":
        return Mp4Sink(path, classes, palette, fps)
    if fmt == "json":
        return JsonSink(path, classes, palette)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
