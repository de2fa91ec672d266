"""Isolated decoding of untrusted videos: probe and decode in a child process, never in the server.

A malicious or pathological upload (a decoder crash, a decompression bomb, a file that never ends)
must not take the server process down or hang it. Every untrusted file is therefore opened only in a
child process that

- sets its own address-space limit (``RLIMIT_AS``), a CPU-time backstop for probes, no core dumps
  and no file writes (``RLIMIT_FSIZE`` = 0) before it opens the file;
- is killed when it produces nothing for ``timeout_s`` seconds (wall clock);
- reports a decoding failure as an error message (``VideoError``); any other ending (a signal, an
  out-of-memory kill) is reported as a crash (``DecodeError``).

Children are forked from a ``multiprocessing`` fork server that has PyAV and numpy imported already
(``warm_up`` starts it), so a child costs milliseconds rather than an interpreter start, and it
never inherits the server's threads or its model.

``probe(path)`` returns the ``service.video_io.VideoInfo`` of a file. ``VideoStream(path, ...)`` starts one
child that sends its ``VideoInfo`` and then the decoded frames through a pipe, each frame as an
8-byte header message (height, width as little-endian uint32) and an RGB24 message. The parent checks
every header against ``max_pixels`` before receiving the pixels, so a stream that changes resolution
in the middle cannot exceed the limit either. Decoding in its own process also overlaps it with the
network in the parent for free.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import signal
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from service.video_io import VideoError, VideoInfo

FRAME_HEADER = struct.Struct("<II")  # height, width of the RGB24 frame that follows
MAX_INFO_BYTES = 1 << 16
# Message tags from the child: stream info, frame header, end of stream, decoding error.
INFO, FRAME, END, ERROR = b"I", b"F", b"D", b"E"


class DecodeError(VideoError):
    """The isolated decoder crashed, ran out of memory or time: the file is treated as unsupported."""


class DecodeTimeout(DecodeError):
    """The isolated decoder produced nothing within the wall-clock limit."""


@dataclass(frozen=True)
class DecodeLimits:
    """Resources one child decoder may use."""

    timeout_s: float = 20.0  # wall clock for a probe, and the longest wait for any one frame
    memory_mb: int = 1024  # address-space limit of the child (RLIMIT_AS)
    max_pixels: int = 4096 * 2304  # largest decoded frame accepted through the pipe


def _context() -> Any:
    """The fork-server context; its server preloads PyAV and numpy (once per server process)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["service.video_io"])
    return context


def warm_up() -> None:
    """Start the fork server now (about an interpreter start) instead of on the first upload."""
    child = _context().Process(target=_noop, name="vss-decode-warmup", daemon=True)
    child.start()
    child.join()


def _crash_message(name: str, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with status {exitcode}"
    return f"{name}: the decoder {how} (corrupt or pathological file)"


class VideoStream:
    """One decoding child for one file: its ``VideoInfo`` first (``probe()``), then its frames.

    The child starts at construction, probes, and decodes the first frames ahead while the caller
    checks the probe against its limits; ``close()`` (or leaving the ``with`` block, or closing the
    frame iterator) kills it. Iterating raises ``VideoError`` for an undecodable or truncated file
    (also mid-stream), ``DecodeTimeout``/``DecodeError`` for a hung or crashed decoder.
    """

    def __init__(self, path: str | Path, max_frames: int | None = None, stride: int = 1,
                 limits: DecodeLimits = DecodeLimits(), *, frames: bool = True) -> None:
        self.path, self.limits = Path(path), limits
        context = _context()
        self._conn, child_conn = context.Pipe(duplex=False)
        cpu_s = None if frames else int(limits.timeout_s) + 1
        self._proc = context.Process(target=_child_main, name="vss-decode", daemon=True,
                                     args=(str(self.path), frames, max_frames, stride, limits.memory_mb, cpu_s,
                                           child_conn))
        self._proc.start()
        child_conn.close()  # the child holds the write end now; EOF here means it is gone
        self._info: VideoInfo | None = None

    def _receive(self, buffer: Any = None) -> bytes | int:
        """The next message (or its size, when received into ``buffer``); raises on timeout or death."""
        if not self._conn.poll(self.limits.timeout_s):
            self.close()
            raise DecodeTimeout(f"{self.path.name}: the decoder produced nothing for {self.limits.timeout_s:g} s")
        try:
            if buffer is not None:
                return self._conn.recv_bytes_into(buffer)
            return self._conn.recv_bytes(MAX_INFO_BYTES)
        except (EOFError, OSError) as e:
            self._proc.join(self.limits.timeout_s)
            exitcode = self._proc.exitcode
            self.close()
            raise DecodeError(_crash_message(self.path.name, exitcode)) from e

    def _message(self) -> tuple[bytes, bytes]:
        message = self._receive()
        assert isinstance(message, bytes)
        tag, body = message[:1], message[1:]
        if tag == ERROR:
            self.close()
            raise VideoError(body.decode("utf-8", "replace"))
        return tag, body

    def probe(self) -> VideoInfo:
        """The stream properties (read once from the child; raises ``VideoError``)."""
        if self._info is None:
            tag, body = self._message()
            try:
                if tag != INFO:
                    raise ValueError(f"unexpected message {tag!r}")
                self._info = VideoInfo(**json.loads(body))
            except (ValueError, TypeError) as e:
                self.close()
                raise DecodeError(f"{self.path.name}: the decoder returned no usable stream information") from e
        return self._info

    def __iter__(self) -> Iterator[np.ndarray]:
        self.probe()
        try:
            while True:
                tag, body = self._message()
                if tag == END:
                    return
                if tag != FRAME or len(body) != FRAME_HEADER.size:
                    raise DecodeError(f"{self.path.name}: the decoder sent an unexpected message {tag!r}")
                height, width = FRAME_HEADER.unpack(body)
                if height * width > self.limits.max_pixels or not height or not width:
                    raise VideoError(f"{self.path.name}: a decoded frame is {width}x{height}, over the limit of "
                                     f"{self.limits.max_pixels} pixels")
                frame = np.empty((height, width, 3), np.uint8)
                if self._receive(memoryview(frame).cast("B")) != frame.nbytes:
                    raise DecodeError(f"{self.path.name}: the decoder sent a truncated frame")
                yield frame
        finally:
            self.close()

    def close(self) -> None:
        """Kill the child if it still runs and release the pipe (idempotent)."""
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    """``service.video_io.probe_video`` in a child process under ``limits``; raises ``VideoError``."""
    with VideoStream(path, limits=limits, frames=False) as video:
        try:
            return video.probe()
        except DecodeTimeout as e:
            raise DecodeTimeout(f"{Path(path).name}: probing took longer than {limits.timeout_s:g} s") from e


def iter_frames(path: str | Path, max_frames: int | None = None, stride: int = 1,
                limits: DecodeLimits = DecodeLimits()) -> Iterator[np.ndarray]:
    """``service.video_io.read_frames`` in a child process: yields (H, W, 3) uint8 RGB frames."""
    with VideoStream(path, max_frames, stride, limits) as video:
        yield from video


# --- the child side ------------------------------------------------------------------------------


def _noop() -> None:
    """Target of ``warm_up``."""


def _limit_self(memory_mb: int, cpu_s: int | None) -> None:
    """Resource limits of the child, set before the untrusted file is opened."""
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    if cpu_s:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def _child_main(path: str, frames: bool, max_frames: int | None, stride: int, memory_mb: int,
                cpu_s: int | None, conn: Connection) -> None:
    """Probe ``path`` (and decode it if ``frames``), sending everything through ``conn``."""
    from service import video_io

    try:
        _limit_self(memory_mb, cpu_s)
        conn.send_bytes(INFO + json.dumps(asdict(video_io.probe_video(path))).encode())
        if not frames:
            return
        for frame in video_io.read_frames(path, max_frames=max_frames, stride=stride):
            frame = np.ascontiguousarray(frame)
            conn.send_bytes(FRAME + FRAME_HEADER.pack(frame.shape[0], frame.shape[1]))
            conn.send_bytes(memoryview(frame).cast("B"))
        conn.send_bytes(END)
    except (BrokenPipeError, EOFError):
        return  # the parent stopped listening
    except video_io.VideoError as e:
        _report(conn, str(e))
    except MemoryError:
        _report(conn, f"{Path(path).name}: decoding needs more than the {memory_mb} MB the decoder may use")
    except Exception as e:  # noqa: BLE001 - anything else the decoder raises is the file's fault
        _report(conn, f"{Path(path).name}: undecodable video ({type(e).__name__}: {e})")
    finally:
        conn.close()


def _report(conn: Connection, message: str) -> None:
    try:
        conn.send_bytes(ERROR + message.replace("\n", " ").encode())
    except (BrokenPipeError, EOFError, OSError):
        pass
