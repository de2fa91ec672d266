"""Where a source's overlay goes besides its subscribers: H.264 segments on disk, or an HLS stream.

Both sinks cut the overlay (frame + label colours) into segments of about ``segment_s`` seconds, each
a complete file published by rename (a reader never sees half a segment). Timestamps are the source's
own clock in milliseconds, so dropped frames make a variable frame rate, not a fast-forward.

- ``DiskSink``: ``<dir>/seg-000001.mp4``, ... (MP4, moov first); the newest ``keep`` are kept.
- ``HlsSink``: ``<dir>/seg-000001.ts``, ... (MPEG-TS) and ``<dir>/index.m3u8`` listing the newest
  ``list_size``, rewritten atomically after each segment; a reconnect of the source starts a new
  segment after ``#EXT-X-DISCONTINUITY``; ``close`` adds ``#EXT-X-ENDLIST``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..atomic import publish, temp_beside, write_atomic

TIME_BASE = Fraction(1, 1000)


class SegmentFile:
    """One H.264 segment being written; ``close`` publishes it under its final name."""

    def __init__(self, path: Path, fmt: str, width: int, height: int, fps: float) -> None:
        self.path, self.size = path, (height, width)
        self._tmp = temp_beside(path, ".part")
        self._pad = (height % 2, width % 2)
        options = {"movflags": "+faststart"} if fmt == "mp4" else {}
        try:
            self._container = av.open(str(self._tmp), mode="w", format=fmt, options=options)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        try:
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            self._stream.width, self._stream.height = width + self._pad[1], height + self._pad[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = TIME_BASE
            self._stream.options = {"preset": "veryfast", "crf": "23"}
        except BaseException:
            self.abort()
            raise
        self.first_ms: int | None = None
        self.last_ms = -1
        self.frames = 0

    def write(self, frame: np.ndarray, t_ms: int) -> None:
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        t_ms = max(t_ms, self.last_ms + 1)  # strictly increasing
        video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video.pts, video.time_base = t_ms, TIME_BASE
        for packet in self._stream.encode(video):
            self._container.mux(packet)
        self.first_ms = t_ms if self.first_ms is None else self.first_ms
        self.last_ms = t_ms
        self.frames += 1

    def duration_s(self) -> float:
        """Covered time: first to last frame plus one average frame gap."""
        if self.first_ms is None:
            return 0.0
        span = (self.last_ms - self.first_ms) / 1000.0
        return span + (span / (self.frames - 1) if self.frames > 1 else 0.1)

    def close(self) -> None:
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self._container.close()
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # discarded anyway
        self._tmp.unlink(missing_ok=True)


class _SegmentedSink:
    """Cuts the overlay into segments; subclasses say what happens when one is complete."""

    fmt = "mp4"
    suffix = ".mp4"

    def __init__(self, directory: Path, segment_s: float, fps: float) -> None:
        self.directory, self.segment_s, self.fps = directory, segment_s, fps
        directory.mkdir(parents=True, exist_ok=True)
        self.sequence = 0
        self.segments: list[tuple[str, float]] = []  # (file name, duration) of the published segments
        self._current: SegmentFile | None = None

    def write(self, overlay: np.ndarray, t_ms: int) -> None:
        """Add one overlay frame at source time ``t_ms``; starts a new segment when this one is full."""
        current = self._current
        if current is not None and (current.size != overlay.shape[:2] or
                                    current.first_ms is not None and t_ms - current.first_ms >= self.segment_s * 1000):
            self.cut()
        if self._current is None:
            self.sequence += 1
            height, width = overlay.shape[:2]
            self._current = SegmentFile(self.directory / f"seg-{self.sequence:06d}{self.suffix}", self.fmt,
                                        width, height, self.fps)
        self._current.write(overlay, t_ms)

    def cut(self, discontinuity: bool = False) -> None:
        """Publish the current segment (if any frame was written); ``discontinuity``: the source reconnected."""
        current, self._current = self._current, None
        if current is not None and current.frames == 0:
            current.abort()
        elif current is not None:
            current.close()
            self.segments.append((current.path.name, current.duration_s()))
            self._published()
        if discontinuity:
            self._discontinuity()

    def _published(self) -> None:
        raise NotImplementedError

    def _discontinuity(self) -> None:
        pass

    def close(self) -> None:
        self.cut()


class DiskSink(_SegmentedSink):
    """MP4 segments in ``directory``; the newest ``keep`` stay."""

    def __init__(self, directory: Path, segment_s: float, fps: float, keep: int) -> None:
        super().__init__(directory, segment_s, fps)
        self.keep = keep

    def _published(self) -> None:
        while len(self.segments) > self.keep:
            name, _ = self.segments.pop(0)
            (self.directory / name).unlink(missing_ok=True)


class HlsSink(_SegmentedSink):
    """MPEG-TS segments and a live ``index.m3u8`` in ``directory``."""

    fmt = "mpegts"
    suffix = ".ts"
    PLAYLIST = "index.m3u8"
    GRACE = 2  # segments kept on disk after they leave the playlist, for players still fetching them

    def __init__(self, directory: Path, segment_s: float, fps: float, list_size: int) -> None:
        super().__init__(directory, segment_s, fps)
        self.list_size = list_size
        self._breaks: set[str] = set()  # segments that follow a reconnect
        self._pending_break = False
        self._ended = False

    def _discontinuity(self) -> None:
        self._pending_break = bool(self.segments)

    def _published(self) -> None:
        if self._pending_break:
            self._breaks.add(self.segments[-1][0])
            self._pending_break = False
        self._write_playlist()
        while len(self.segments) > self.list_size + self.GRACE:
            name, _ = self.segments.pop(0)
            self._breaks.discard(name)
            (self.directory / name).unlink(missing_ok=True)

    def _write_playlist(self) -> None:
        listed = self.segments[-self.list_size:]
        first = int(listed[0][0][len("seg-"):-len(self.suffix)]) if listed else 0
        target = max([math.ceil(d) for _, d in listed] + [1])
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}", f"#EXT-X-MEDIA-SEQUENCE:{first}"]
        for name, duration in listed:
            if name in self._breaks:
                lines.append("#EXT-X-DISCONTINUITY")
            lines += [f"#EXTINF:{duration:.3f},", name]
        if self._ended:
            lines.append("#EXT-X-ENDLIST")
        write_atomic(self.directory / self.PLAYLIST, ("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        self._ended = True
        had = len(self.segments)
        super().close()
        if len(self.segments) == had and self.segments:  # nothing new was published: still mark the end
            self._write_playlist()
