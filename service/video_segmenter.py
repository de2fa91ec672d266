"""The overlapped segmentation loop behind ``POST /v1/segment`` and ``vss segment``.

``segment_frames`` segments decoded frames into a ``service.outputs`` sink with the stages
overlapped: a producer thread prefetches frames (for uploads the decoding itself runs in the child
process of ``service.sandboxed_decode``), resizes them and computes their optical flow
(``StreamSegmenter.prepare``, handed to ``advance`` with the frame), the network runs in the caller's
thread, and the label maps (upsampling + argmax at the video's resolution), overlay drawing and
encoding run in a writer thread, with small bounded queues in between. ``segment_video`` runs it on
a video file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.flow import FlowProvider

from . import crashpoints
from .engine import Engine
from .outputs import FORMATS, Sink, make_sink
from .stream_segmenter import FrameResult, PendingFrame, PreparedFrame, StreamSegmenter
from .video_io import VideoError, VideoInfo, probe_video, read_frames

_END = object()
QUEUED_FRAME_BYTES = 48 << 20  # frames each queue may hold, in bytes: 4K frames queue one at a time (budget.py)
Progress = Callable[[int, int], None]  # (frames done, expected total)


def close_iterator(it: Iterator[Any]) -> None:
    """Close ``it`` when it can be closed (a generator): its ``finally`` blocks release what it holds."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def prefetch(items: Iterable[Any], depth: int, stop: threading.Event) -> Iterator[Any]:
    """Iterate ``items`` in a producer thread at most ``depth`` ahead; its errors surface here."""
    q: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        outcome: tuple[Any, BaseException | None] = (_END, None)
        try:
            for item in it:
                if not offer((item, None)):
                    break
        except BaseException as e:  # noqa: BLE001 - handed over to the consumer
            outcome = (_END, e)
        finally:
            close_iterator(it)  # e.g. kills the decoder child when the consumer stopped early
        offer(outcome)

    thread = threading.Thread(target=produce, name="vss-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class SinkWriter:
    """Finishes frames in its own thread, fed through a bounded queue: the label map (upsampling to the
    video's resolution + argmax, ``PendingFrame.resolve``), then the sink, then ``on_result``; so that
    post-processing and encoding overlap the network's work on the next frame."""

    def __init__(self, sink: Sink, depth: int = 4,
                 on_result: Callable[[np.ndarray, FrameResult], None] | None = None) -> None:
        self.sink, self.on_result = sink, on_result
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vss-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self._error is None:
                try:
                    frame, pending = item
                    result = pending.resolve()
                    self.sink.add(frame, result)
                    if self.on_result is not None:
                        self.on_result(frame, result)
                except BaseException as e:  # noqa: BLE001 - re-raised by put()/close()
                    self._error = e

    def put(self, frame: np.ndarray, pending: PendingFrame) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((frame, pending))

    def close(self) -> None:
        """Wait until every queued frame is in the sink; raise the first error of the thread if any."""
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error


def prepared(frames: Iterable[np.ndarray],
             segmenter: StreamSegmenter) -> Iterator[tuple[np.ndarray, PreparedFrame]]:
    """(frame, the frame prepared for ``segmenter.advance``): run in the prefetch thread, so that the
    resizing and the flow of frame t are computed while the network works on frame t-1."""
    it = iter(frames)
    previous = None
    try:
        for frame in it:
            ready = segmenter.prepare(frame, previous)
            yield frame, ready
            previous = ready.small
    finally:
        close_iterator(it)


def segment_frames(engine: Any, flow: FlowProvider, frames: Iterable[np.ndarray], info: VideoInfo,
                   out_path: Path, fmt: str, *, stride: int = 1, input_size: tuple[int, int] | None = None,
                   progress: Callable[[int], None] | None = None,
                   on_frame: Callable[[np.ndarray, FrameResult], None] | None = None,
                   depth: int = 3) -> dict[str, Any]:
    """Segment decoded frames into ``out_path`` (written atomically by the sink); returns a summary.

    Raises ``VideoError`` when decoding fails mid-way or there are no frames; nothing is left on disk.
    Each queue holds at most ``depth`` frames and ``QUEUED_FRAME_BYTES`` (at least one frame).
    """
    depth = max(1, min(depth, QUEUED_FRAME_BYTES // max(3 * info.width * info.height, 1)))
    classes = list(engine.meta["classes"])
    palette = np.asarray(engine.meta["palette"], dtype=np.uint8).reshape(-1, 3)
    fps = info.fps / stride
    segmenter = StreamSegmenter(engine, flow, input_size=input_size)
    sink = make_sink(fmt, out_path, classes, palette, fps)
    shares = np.zeros(len(classes))  # summed in the writer thread, read after close() joined it

    def finished(frame: np.ndarray, result: FrameResult) -> None:
        shares[:] += [result.class_fractions[c] for c in classes]
        if on_frame is not None:
            on_frame(frame, result)

    writer = SinkWriter(sink, depth, finished)
    done, start, stop = 0, time.perf_counter(), threading.Event()
    try:
        for frame, ready in prefetch(prepared(frames, segmenter), depth, stop):
            writer.put(frame, segmenter.advance(frame, ready))
            done += 1
            if done == 1:
                crashpoints.reached("segment_frame")
            if progress is not None:
                progress(done)
        writer.close()
        if done == 0:
            raise VideoError("the video has no decodable frames")
        seconds = time.perf_counter() - start
        summary = {
            "format": fmt, "frames": done, "fps": round(fps, 4), "width": info.width, "height": info.height,
            "stride": stride, "input_size": list(segmenter.input_size), "model_version": engine.version,
            "backend": engine.backend, "flow": flow.name,
            "seconds": round(seconds, 3), "ms_per_frame": round(1000.0 * seconds / done, 2),
            "class_fractions": {c: round(float(s) / done, 6) for c, s in zip(classes, shares, strict=True)},
        }
        sink.finish(summary)
    except BaseException:
        try:
            writer.close()
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            pass
        sink.abort()
        raise
    return summary


def _expected_total(info: VideoInfo, max_frames: int | None, stride: int) -> int:
    total = -(-info.frames // stride) if info.frames else 0
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    return total


def segment_video(engine: Engine, flow: FlowProvider, video_path: str | Path, out_path: str | Path, fmt: str, *,
                  max_frames: int | None = None, stride: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Segment every ``stride``-th frame (at most ``max_frames``) of a video file into ``out_path``.

    Raises ``VideoError`` for unreadable input (nothing is written then) and ``ValueError`` for a bad
    format or arguments. Returns a summary: frames, fps, model_version, seconds, ms_per_frame, ...
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    info = probe_video(video_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total = _expected_total(info, max_frames, stride)
    report = None if progress is None else (lambda done: progress(done, max(total, done)))
    frames = read_frames(video_path, max_frames=max_frames, stride=stride)
    summary = segment_frames(engine, flow, frames, info, out_path, fmt, stride=stride, progress=report)
    return {**summary, "output": str(out_path)}
