"""Uploaded videos: the streaming multipart receiver and the overlapped segmentation loop.

``receive_upload`` parses a ``multipart/form-data`` body as it arrives and writes the ``video`` part
to disk in chunks, stopping with 413 as soon as the byte limit is passed (a ``Content-Length`` over
the limit is refused before a single body byte is read); nothing is ever held whole in memory.

``segment_frames`` segments decoded frames into a ``service.outputs`` sink with the stages
overlapped: a producer thread prefetches frames (the decoding itself runs in the child process of
``service.decode``) and computes their optical flow, the network runs in the caller's thread, and
the label maps (upsampling + argmax at the video's resolution), overlay drawing and encoding run in a
writer thread, with small bounded queues in between.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from models.flow import FlowProvider

from .deps import ApiError
from .outputs import Sink, make_sink
from .pipeline import FrameResult, PendingFrame, StreamSegmenter, resize_rgb
from .video import VideoError, VideoInfo

FIELD = "video"  # the multipart field that carries the video
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small extra fields allowed on top of the limit
WRITE_CHUNK = 1 << 20
MEDIA_TYPES = {"zip": "application/zip", "mp4": "video/mp4", "json": "application/json"}
_END = object()


@dataclass(frozen=True)
class Upload:
    path: Path
    filename: str
    size: int


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the upload is larger than the limit of {limit} bytes "
                                              f"({limit / 2**20:.1f} MiB)")


async def receive_upload(request: Request, dest: Path, max_bytes: int) -> Upload:
    """Stream the ``video`` part of a multipart body into ``dest``; raise ``ApiError`` 413/415/400/422."""
    media, params = parse_options_header(request.headers.get("content-type"))
    if media != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"send the video as multipart/form-data with a file field "
                                                      f"named '{FIELD}' (got Content-Type "
                                                      f"{media.decode('latin-1') or 'none'})")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data body without a boundary parameter")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)

    part: dict[str, Any] = {}
    names: list[str] = []
    pending: list[bytes] = []
    state = {"video_parts": 0, "video_bytes": 0, "filename": ""}
    header = {"field": b"", "value": b"", "disposition": b""}

    def on_part_begin() -> None:
        part.clear()
        header["disposition"] = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if header["field"].lower() == b"content-disposition":
            header["disposition"] = header["value"]
        header["field"] = header["value"] = b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(header["disposition"])
        name = options.get(b"name", b"").decode("utf-8", "replace")
        names.append(name)
        part["is_video"] = name == FIELD
        if part["is_video"]:
            state["video_parts"] += 1
            state["filename"] = options.get(b"filename", b"").decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.get("is_video") and state["video_parts"] == 1:
            pending.append(bytes(data[start:end]))
            state["video_bytes"] += end - start

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    with open(dest, "wb") as out:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes + MULTIPART_OVERHEAD:
                    raise _too_large(max_bytes)
                parser.write(chunk)
                if state["video_bytes"] > max_bytes:
                    raise _too_large(max_bytes)
                if sum(map(len, pending)) >= WRITE_CHUNK:
                    await run_in_threadpool(out.writelines, pending[:])
                    pending.clear()
            parser.finalize()
        except FormParserError as e:
            raise ApiError(400, "bad_request", f"malformed multipart body: {e}") from e
        await run_in_threadpool(out.writelines, pending[:])
    if state["video_parts"] == 0:
        got = ", ".join(repr(n) for n in names) or "no parts"
        raise ApiError(422, "missing_video", f"the multipart body has no '{FIELD}' field (got {got})")
    if state["video_parts"] > 1:
        raise ApiError(422, "invalid_request", f"send exactly one '{FIELD}' part, got {state['video_parts']}")
    if state["video_bytes"] == 0:
        raise ApiError(415, "unsupported_media_type", "the uploaded video is empty (0 bytes)")
    return Upload(dest, state["filename"], state["video_bytes"])


# --- the segmentation loop ---------------------------------------------------------------------


class SizedSegmenter(StreamSegmenter):
    """A ``StreamSegmenter`` that runs the network at a caller-chosen input size (the ``size`` option)."""

    def __init__(self, engine: Any, flow: FlowProvider, input_size: tuple[int, int] | None = None,
                 output_size: tuple[int, int] | None = None) -> None:
        super().__init__(engine, flow, output_size)
        self._input_size = input_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size or super().input_size


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
            close = getattr(it, "close", None)
            if close is not None:
                close()  # e.g. kills the decoder child when the consumer stopped early
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


class LookaheadFlow:
    """A flow provider that returns the flow ``with_flow`` already computed for the frame being segmented."""

    def __init__(self, provider: FlowProvider) -> None:
        self.name = getattr(provider, "name", type(provider).__name__)
        self.next: np.ndarray | None = None

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray | None:
        flow, self.next = self.next, None
        if flow is not None and flow.shape[:2] != current.shape[:2]:
            raise RuntimeError(f"precomputed flow {flow.shape[:2]} does not match the frame {current.shape[:2]}")
        return flow


def with_flow(frames: Iterable[np.ndarray], flow: FlowProvider,
              size: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(frame, backward flow from the previous frame at model input ``size``): run in the prefetch thread,
    so the flow of frame t is computed while the network works on frame t-1."""
    it = iter(frames)
    previous = None
    try:
        for frame in it:
            small = resize_rgb(frame, size)
            yield frame, (None if previous is None else flow(previous, small))
            previous = small
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def segment_frames(engine: Any, flow: FlowProvider, frames: Iterable[np.ndarray], info: VideoInfo,
                   out_path: Path, fmt: str, *, stride: int = 1, input_size: tuple[int, int] | None = None,
                   progress: Callable[[int], None] | None = None,
                   on_frame: Callable[[np.ndarray, FrameResult], None] | None = None,
                   depth: int = 3) -> dict[str, Any]:
    """Segment decoded frames into ``out_path`` (written atomically by the sink); returns a summary.

    Raises ``VideoError`` when decoding fails mid-way or there are no frames; nothing is left on disk.
    """
    classes = list(engine.meta["classes"])
    palette = np.asarray(engine.meta["palette"], dtype=np.uint8).reshape(-1, 3)
    fps = info.fps / stride
    lookahead = LookaheadFlow(flow)
    segmenter = SizedSegmenter(engine, lookahead, input_size)
    sink = make_sink(fmt, out_path, classes, palette, fps)
    shares = np.zeros(len(classes))  # summed in the writer thread, read after close() joined it

    def finished(frame: np.ndarray, result: FrameResult) -> None:
        shares[:] += [result.class_fractions[c] for c in classes]
        if on_frame is not None:
            on_frame(frame, result)

    writer = SinkWriter(sink, depth, finished)
    done, start, stop = 0, time.perf_counter(), threading.Event()
    try:
        for frame, frame_flow in prefetch(with_flow(frames, flow, segmenter.input_size), depth, stop):
            lookahead.next = frame_flow
            writer.put(frame, segmenter.advance(frame))
            done += 1
            if progress is not None:
                progress(done)
        writer.close()
        if done == 0:
            raise VideoError("the video has no decodable frames")
        seconds = time.perf_counter() - start
        summary = {
            "format": fmt, "frames": done, "fps": round(fps, 4), "width": info.width, "height": info.height,
            "stride": stride, "input_size": list(segmenter.input_size), "model_version": engine.version,
            "backend": engine.backend, "flow": lookahead.name,
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
