"""Video decoding and encoding with PyAV (no ffmpeg subprocess).

Every failure a user can cause (missing, empty, corrupt, truncated or unsupported file) surfaces as
``VideoError`` with a one-line message. Frames are (H, W, 3) uint8 RGB arrays with the container's
rotation metadata applied, so a portrait phone clip comes out portrait.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import av.error
import numpy as np

from .atomic import publish, temp_beside

DEFAULT_FPS = 25.0  # used when a container states no frame rate at all
# A container that only *estimates* its frame count (duration x rate, e.g. WebM) is reported as
# truncated when fewer than this share of the estimated frames could be decoded.
ESTIMATE_TRUNCATION_SHARE = 0.8


class VideoError(ValueError):
    """The video is missing, empty, corrupt, truncated, unreadable or in an unsupported format."""


@dataclass(frozen=True)
class VideoInfo:
    """Stream properties; width/height are AFTER rotation, ``frames`` may be an estimate (0 = unknown)."""

    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    rotation: int  # counter-clockwise degrees applied to decoded frames (0, 90, 180 or 270)
    codec: str


def _message(path: Path, e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return f"{path.name}: corrupt, truncated or unsupported video ({text})"


def _open(path: str | Path) -> tuple[Path, Any]:
    """Open a container with one video stream or raise ``VideoError``."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise VideoError(f"{path.name}: empty file")
    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as e:
        raise VideoError(_message(path, e)) from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path.name}: no video stream")
    return path, container


def normalize_rotation(degrees: float | int | None) -> int:
    """Round a display-matrix angle (counter-clockwise, any sign) to 0, 90, 180 or 270."""
    if not degrees:
        return 0
    return int(round(float(degrees) / 90.0)) % 4 * 90


def apply_rotation(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate an (H, W, ...) frame counter-clockwise by ``rotation`` degrees (a multiple of 90)."""
    k = normalize_rotation(rotation) // 90
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


def _fps(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            value = float(rate)
            if 0 < value < 1000:
                return value
    return DEFAULT_FPS


def _duration_s(container: Any, stream: Any) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration) / av.time_base
    return 0.0


def _expected_frames(container: Any, stream: Any, duration_s: float, fps: float) -> tuple[int, bool]:
    """(frame count, exact?) from the container: the stream's index when it has one (MP4, AVI), else an
    estimate from a header duration (Matroska/WebM only: elsewhere durations may be guessed from the
    bitrate), else (0, False)."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames), True
    if duration_s > 0 and "matroska" in container.format.name:
        return int(round(duration_s * fps)), False
    return 0, False


def probe_video(path: str | Path) -> VideoInfo:
    """Read the stream properties (decodes the first frame to check the file and its rotation)."""
    path, container = _open(path)
    with container:
        stream = container.streams.video[0]
        fps = _fps(stream)
        duration = _duration_s(container, stream)
        frames, _ = _expected_frames(container, stream, duration, fps)
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as e:
            raise VideoError(_message(path, e)) from e
        if first is None:
            raise VideoError(f"{path.name}: no decodable frames")
        rotation = normalize_rotation(first.rotation)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        if duration <= 0 and frames:
            duration = frames / fps
        return VideoInfo(width, height, fps, frames, duration, rotation, stream.codec_context.name)


def read_frames(path: str | Path, max_frames: int | None = None, stride: int = 1) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames: every ``stride``-th one, at most ``max_frames`` of them.

    Raises ``VideoError`` (also in the middle of the stream) for corrupt data, for an empty video, and
    for a silent truncation: fewer packets than the container's index declares (MP4, AVI), or for
    Matroska/WebM fewer than 80% of the frames its header duration implies. Checked at the end of the
    stream, so a caller that stops early (``max_frames``) never sees it.
    """
    if stride < 1:
        raise VideoError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be >= 1, got {max_frames}")
    path, container = _open(path)
    with container:
        stream = container.streams.video[0]
        expected, exact = _expected_frames(container, stream, _duration_s(container, stream), _fps(stream))
        # Packets, not frames, are compared with the container's count: frames that an MP4 edit list
        # hides are still demuxed, so a trimmed (valid) file is not mistaken for a truncated one.
        packets = decoded = yielded = 0
        try:
            for packet in container.demux(stream):
                packets += 1 if packet.size else 0
                for frame in packet.decode():
                    if decoded % stride == 0:
                        rgb = frame.to_ndarray(format="rgb24")
                        yield apply_rotation(rgb, normalize_rotation(frame.rotation))
                        yielded += 1
                        if max_frames is not None and yielded >= max_frames:
                            return
                    decoded += 1
        except av.error.FFmpegError as e:
            raise VideoError(f"{_message(path, e)} after {decoded} frames") from e
        if decoded == 0:
            raise VideoError(f"{path.name}: no decodable frames")
        if exact and packets < expected:
            raise VideoError(f"{path.name}: truncated video: the container declares {expected} frames "
                             f"but only {packets} are present")
        if not exact and expected and decoded < ESTIMATE_TRUNCATION_SHARE * expected:
            raise VideoError(f"{path.name}: truncated video: about {expected} frames expected from its "
                             f"duration but only {decoded} could be decoded")


class VideoWriter:
    """H.264 (libx264, yuv420p) MP4 writer; a context manager that publishes the file only on success.

    Frames are written to a temp file beside ``path`` and renamed onto it on a clean ``close()``;
    on an exception inside the ``with`` block the temp file is removed. Odd sizes are padded to even
    (edge pixels repeated), as 4:2:0 chroma needs. ``rotation`` (counter-clockwise degrees) is stored
    as display-matrix metadata and is applied by players and by ``read_frames``.
    """

    def __init__(self, path: str | Path, fps: float, width: int, height: int, crf: int = 23,
                 preset: str = "veryfast", rotation: int = 0) -> None:
        if width < 1 or height < 1:
            raise VideoError(f"invalid video size {width}x{height}")
        if not fps or fps <= 0:
            raise VideoError(f"invalid frame rate {fps}")
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.frames = 0
        self._pad = (self.height % 2, self.width % 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_beside(self.path, ".mp4")
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4",
                                      options={"movflags": "+faststart"})  # playable while downloading
            rate = Fraction(fps).limit_denominator(1001)
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width = self.width + self._pad[1]
            self._stream.height = self.height + self._pad[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(int(crf)), "preset": preset}
            if normalize_rotation(rotation):
                self._stream.set_display_rotation(normalize_rotation(rotation))
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._closed = False

    def write(self, frame_rgb: np.ndarray) -> None:
        """Encode one (height, width, 3) uint8 RGB frame."""
        if self._closed:
            raise VideoError("write() on a closed VideoWriter")
        if frame_rgb.shape != (self.height, self.width, 3) or frame_rgb.dtype != np.uint8:
            raise VideoError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, "
                             f"got {frame_rgb.shape} {frame_rgb.dtype}")
        if any(self._pad):
            frame_rgb = np.pad(frame_rgb, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and publish the file atomically (at least one frame must have been written)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.frames == 0:
                raise VideoError(f"{self.path.name}: no frames were written")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the output: close the container and remove the temp file."""
        self._closed = True
        try:
            self._container.close()
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # the file is being discarded anyway
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
