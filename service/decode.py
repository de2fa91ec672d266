"""Isolated decoding of untrusted videos: probe and decode in a child process, never in the server.

A malicious or pathological upload (a decoder crash, a decompression bomb, a file that never ends)
must not take the server process down or hang it. Every untrusted file is therefore opened only by
``python -m service.decode`` in a child process that

- sets its own address-space limit (``RLIMIT_AS``), a CPU-time backstop for probes, no core dumps
  and no file writes (``RLIMIT_FSIZE`` = 0) before it opens the file;
- is killed when it produces nothing for ``timeout_s`` seconds (wall clock);
- reports a decoding failure as one line on stderr with exit status 2 (``VideoError``); any other
  ending (a signal, a memory error) is a crash.

``probe(path, ...)`` returns the ``service.video.VideoInfo`` of a file. ``VideoStream(path, ...)``
starts one child that sends its ``VideoInfo`` (a uint32 LE length + JSON) and then the decoded
frames through a pipe: each frame is an 8-byte header (height, width as little-endian uint32)
followed by ``height * width * 3`` bytes of RGB24. The parent checks every header against
``max_pixels`` before reading the pixels, so a stream that changes its resolution in the middle
cannot exceed the limit either. Decoding in its own process also overlaps it with the network in
the parent for free. ``iter_frames`` wraps ``VideoStream`` as a generator.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.video import VideoError, VideoInfo

FRAME_HEADER = struct.Struct("<II")  # height, width of the RGB24 frame that follows
EXIT_VIDEO_ERROR = 2  # the child found the file undecodable and said why on stderr
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


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


def _child_command(args: list[str], limits: DecodeLimits) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OMP_", "MALLOC_"))}
    env.update(PYTHONPATH=_PROJECT_ROOT, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, "-m", "service.decode", *args, "--memory-mb", str(limits.memory_mb)]
    return cmd, env


def _crash_message(name: str, returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    last = stderr.strip().splitlines()[-1][:200] if stderr.strip() else ""
    return f"{name}: the decoder {how} (corrupt or pathological file){': ' + last if last else ''}"


def _video_error(name: str, returncode: int, stderr: str) -> VideoError:
    if returncode == EXIT_VIDEO_ERROR and stderr.strip():
        return VideoError(stderr.strip().splitlines()[-1])
    return DecodeError(_crash_message(name, returncode, stderr))


def probe(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    """``service.video.probe_video`` in a child process under ``limits``; raises ``VideoError``."""
    path = Path(path)
    cmd, env = _child_command(["probe", str(path), "--cpu-s", str(int(limits.timeout_s) + 1)], limits)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=limits.timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise DecodeTimeout(f"{path.name}: probing took longer than {limits.timeout_s:g} s") from e
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        raise _video_error(path.name, done.returncode, stderr)
    try:
        return VideoInfo(**json.loads(done.stdout))
    except (ValueError, TypeError) as e:
        raise DecodeError(f"{path.name}: the decoder returned no usable stream information") from e


def _read_exact(proc: subprocess.Popen[bytes], view: memoryview, timeout_s: float) -> int:
    """Fill ``view`` from the child's stdout; returns the bytes read (short only at end of stream)."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    got = 0
    while got < len(view):
        ready, _, _ = select.select([fd], [], [], timeout_s)
        if not ready:
            raise DecodeTimeout(f"the decoder produced nothing for {timeout_s:g} s")
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


class VideoStream:
    """One decoding child for one file: its ``VideoInfo`` first (``probe()``), then its frames.

    The child starts at construction, probes, and decodes the first frames ahead while the caller
    checks the probe against its limits; ``close()`` (or leaving the ``with`` block, or closing the
    frame iterator) kills it. Iterating raises ``VideoError`` for an undecodable or truncated file
    (also mid-stream), ``DecodeTimeout``/``DecodeError`` for a hung or crashed decoder.
    """

    def __init__(self, path: str | Path, max_frames: int | None = None, stride: int = 1,
                 limits: DecodeLimits = DecodeLimits()) -> None:
        self.path, self.limits = Path(path), limits
        args = ["stream", str(self.path), "--stride", str(stride)]
        if max_frames is not None:
            args += ["--max-frames", str(max_frames)]
        cmd, env = _child_command(args, limits)
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._info: VideoInfo | None = None

    def _read(self, view: memoryview) -> int:
        return _read_exact(self._proc, view, self.limits.timeout_s)

    def _fail(self) -> VideoError:
        """The error the child reported (it has exited or is killed now)."""
        try:
            self._proc.wait(timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            return DecodeTimeout(f"{self.path.name}: the decoder did not exit")
        stderr = self._proc.stderr.read().decode("utf-8", "replace")  # type: ignore[union-attr]
        return _video_error(self.path.name, self._proc.returncode, stderr)

    def probe(self) -> VideoInfo:
        """The stream properties (read once from the child; raises ``VideoError``)."""
        if self._info is None:
            size = bytearray(4)
            try:
                if self._read(memoryview(size)) < 4:
                    raise self._fail()
                body = bytearray(int.from_bytes(size, "little"))
                if len(body) > 1 << 16 or self._read(memoryview(body)) < len(body):
                    raise DecodeError(f"{self.path.name}: the decoder returned no usable stream information")
                self._info = VideoInfo(**json.loads(body))
            except DecodeTimeout as e:
                self.close()
                raise DecodeTimeout(f"{self.path.name}: probing took longer than {self.limits.timeout_s:g} s") from e
            except (ValueError, TypeError) as e:
                if isinstance(e, VideoError):
                    raise
                raise DecodeError(f"{self.path.name}: the decoder returned no usable stream information") from e
        return self._info

    def __iter__(self) -> Iterator[np.ndarray]:
        self.probe()
        header = bytearray(FRAME_HEADER.size)
        try:
            while True:
                got = self._read(memoryview(header))
                if got == 0:
                    break
                if got < FRAME_HEADER.size:
                    raise DecodeError(f"{self.path.name}: the decoder stopped in the middle of a frame")
                height, width = FRAME_HEADER.unpack(header)
                if height * width > self.limits.max_pixels or not height or not width:
                    raise VideoError(f"{self.path.name}: a decoded frame is {width}x{height}, over the limit of "
                                     f"{self.limits.max_pixels} pixels")
                frame = np.empty((height, width, 3), np.uint8)
                if self._read(memoryview(frame).cast("B")) < frame.nbytes:
                    break  # the child died mid-frame: its exit status says why
                yield frame
            self._proc.wait(timeout=self.limits.timeout_s)
            if self._proc.returncode != 0:
                raise self._fail()
        except subprocess.TimeoutExpired as e:
            raise DecodeTimeout(f"{self.path.name}: the decoder did not exit after its last frame") from e
        finally:
            self.close()

    def close(self) -> None:
        """Kill the child if it still runs and release its pipes (idempotent)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_frames(path: str | Path, max_frames: int | None = None, stride: int = 1,
                limits: DecodeLimits = DecodeLimits()) -> Iterator[np.ndarray]:
    """``service.video.read_frames`` in a child process: yields (H, W, 3) uint8 RGB frames."""
    with VideoStream(path, max_frames, stride, limits) as video:
        yield from video


# ---------------------------------------------------------------------------------------------------
# The child side: ``python -m service.decode probe|frames PATH ...``.


def _limit_self(memory_mb: int, cpu_s: int | None) -> None:
    """Resource limits of the child, set before the untrusted file is opened."""
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    if cpu_s:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def _child_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.decode")
    parser.add_argument("command", choices=("probe", "stream"))
    parser.add_argument("path")
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--cpu-s", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--stride", type=int, default=1)
    args = parser.parse_args(argv)
    _limit_self(args.memory_mb, args.cpu_s)
    from service import video

    try:
        info = json.dumps(asdict(video.probe_video(args.path))).encode()
        if args.command == "probe":
            sys.stdout.buffer.write(info)
            return 0
        out = sys.stdout.buffer
        out.write(len(info).to_bytes(4, "little") + info)
        out.flush()
        for frame in video.read_frames(args.path, max_frames=args.max_frames, stride=args.stride):
            frame = np.ascontiguousarray(frame)
            out.write(FRAME_HEADER.pack(frame.shape[0], frame.shape[1]))
            out.write(memoryview(frame).cast("B"))
        out.flush()
        return 0
    except video.VideoError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return EXIT_VIDEO_ERROR
    except BrokenPipeError:
        return 0  # the parent stopped reading: nothing left to do


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
