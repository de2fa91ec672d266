"""One server-side source: a reader thread that (re)connects and decodes, a worker thread that segments.

Reader: open the URL (re-checked by the policy on every connect), decode with PyAV, pace files to
their own clock (``realtime``), and hand frames to a drop-oldest ``FrameQueue``. When the source drops
(an error, a read timeout, or the end of a live stream) it waits ``min_s * 2**(n-1)`` seconds, at most
``max_s``, and reconnects; errors that retrying cannot fix (not a video, refused by the policy, over
the pixel limit, an HTTP 4xx) end it as ``failed``.

Worker: the same streaming path as ``WS /v1/stream`` — a ``StreamSegmenter`` on the registry's
current engine behind the app's FIFO engine lock (one network forward per frame; a keyframe after a
reconnect or a model swap), the clip-buffer sampler when ``collect`` is on, then the sinks and the
subscribers (label maps encoded once per format, in the ``WS /v1/stream`` message format).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av.error
import numpy as np

from ..segment_jobs import LockedEngine
from ..engine_manager import NotReady
from ..stream_segmenter import StreamSegmenter, overlay
from ..stream_codec import encode_labels
from ..video_io import apply_rotation, normalize_rotation
from .feed import FrameQueue, Subscriber
from .fetch import SourceError, classify, open_container
from .policy import PolicyError, Unresolvable, redact
from .sinks import DiskSink, HlsSink

log = logging.getLogger(__name__)

CONNECTING, RUNNING, RECONNECTING, FAILED, STOPPED = "connecting", "running", "reconnecting", "failed", "stopped"
STATES = (CONNECTING, RUNNING, RECONNECTING, FAILED, STOPPED)
DEFAULT_FPS = 25.0
MAX_LEAD_S = 5.0  # a file frame stamped further ahead of the pacing clock than this resets the clock


@dataclass(frozen=True)
class SourceSpec:
    """What the client asked for (validated by the route)."""

    url: str
    name: str | None = None
    size: tuple[int, int] | None = None  # (h, w) of the label maps; None: the frame's size
    collect: bool = False
    sinks: tuple[str, ...] = ()  # "disk", "hls"
    segment_s: float = 4.0
    on_end: str = "auto"  # "stop" | "reconnect" | "auto": stop when the stream had a duration (a file)
    realtime: bool = True  # pace decoding to the stream's timestamps
    provenance: Any = None  # service.collect.Provenance of the request that created the source


@dataclass
class _Item:
    index: int
    frame: Any  # av.VideoFrame, converted to RGB by the worker (dropped frames are never converted)
    epoch: int  # connection number: a new one starts with a keyframe
    received: float  # perf_counter when decoded
    t_ms: int  # source clock (ms since the source started) for the sinks


class Source:
    """A running source; ``ctx`` is the ``SourceManager`` (settings, policy, engine, lock, metrics, drift)."""

    def __init__(self, spec: SourceSpec, ctx: Any) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.spec, self.ctx = spec, ctx
        settings = ctx.settings
        self.queue = FrameQueue(settings.sources_queue_size)
        self.state, self.error = CONNECTING, None
        self.created = time.time()
        self.frames = self.segmented = self.dropped = self.reconnects = 0
        self.width = self.height = 0
        self.source_fps = 0.0
        self.model_version: str | None = None
        self.retry_at: float | None = None
        self._epoch = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._finished = False  # the worker has ended: every result was delivered
        self._final: tuple[str, str | None] = (STOPPED, None)  # what the reader ended with
        self._finite = False  # the stream declared a duration (so its end is the end, not a drop)
        self._times: deque[float] = deque(maxlen=32)  # when recent frames were segmented (fps)
        self._t0 = time.monotonic()
        self.output = Path(settings.sources_output_dir) / self.id
        self.sinks: dict[str, Any] = {}
        self._segmenter: StreamSegmenter | None = None
        self._raw_engine: Any = None
        self._sampler = ctx.sampler(spec) if spec.collect else None
        self._drift = ctx.drift  # service/drift.py; this source is the stream "source:<id>"
        self._drift_id = self._drift.open_stream(f"source:{self.id}")
        self._router = ctx.routes.open(self._drift_id)  # service/routing.py: the version per frame
        ctx.metrics.sources.labels(state=self.state).inc()
        self._reader = threading.Thread(target=self._read_loop, name=f"vss-source-{self.id}-read", daemon=True)
        self._worker = threading.Thread(target=self._work_loop, name=f"vss-source-{self.id}-work", daemon=True)

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._reader.start()
        self._worker.start()

    def request_stop(self) -> None:
        """Ask both threads to end (``stop`` waits for them)."""
        self._stop.set()

    def stop(self, timeout: float) -> bool:
        """Stop both threads (a blocked read ends within the read timeout); True when they ended."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in (self._reader, self._worker):
            if thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
        if not self.ended:
            self._set_state(STOPPED)
        return not (self._reader.is_alive() or self._worker.is_alive())

    @property
    def ended(self) -> bool:
        return self.state in (FAILED, STOPPED)

    def _set_state(self, state: str, error: str | None = None) -> None:
        """Move to ``state``; ``error`` becomes the last error (kept until another one replaces it)."""
        with self._lock:
            previous, self.state = self.state, state
            self.error = error if error is not None else self.error
        if previous != state:
            metric = self.ctx.metrics.sources
            metric.labels(state=previous).dec()
            metric.labels(state=state).inc()
            log.info("source %s: %s%s", self.id, state, f" ({error})" if error else "")
        self._broadcast(("state", self.state_message()))

    def state_message(self) -> dict[str, Any]:
        return {"type": "state", "source": self.id, "state": self.state, "error": self.error}

    # --- subscribers -----------------------------------------------------------------------------------
    def subscribe(self, subscriber: Subscriber) -> None:
        """Receive the results from now on; a source whose worker has finished answers "end" at once."""
        with self._lock:
            self._subscribers.append(subscriber)
            finished = self._finished
        if finished:
            subscriber.offer(("end", self.state_message()))

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.offer(message)

    # --- reader ----------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        settings, failures = self.ctx.settings, 0
        try:
            while not self._stop.is_set():
                decoded = 0
                try:
                    target = self.ctx.policy.check(self.spec.url)
                    container = open_container(target, self.ctx.policy, settings.sources_connect_timeout_s,
                                               settings.sources_read_timeout_s)
                    try:
                        decoded = self._decode(container)
                    finally:
                        container.close()
                    if self._stop.is_set():
                        break
                    if self.spec.on_end == "stop" or (self.spec.on_end == "auto" and self._finite):
                        self._final = (STOPPED, "end of stream")
                        return
                    error = SourceError("end of stream" if decoded else "the stream ended before its first frame")
                except Unresolvable as e:
                    error = SourceError(e.message)
                except PolicyError as e:
                    error = SourceError(f"refused: {e.message}", permanent=True)
                except Exception as e:  # noqa: BLE001 - every failure becomes the source's state, never a crash
                    error = classify(e, live=self.spec.url.lower().startswith("rtsp:"))
                    if isinstance(e, av.error.ExitError):
                        error = SourceError(f"no data for {settings.sources_read_timeout_s:g} s (timed out)")
                if self._stop.is_set():
                    break
                if error.permanent:
                    self._final = (FAILED, error.message)
                    return
                failures = 1 if decoded else failures + 1
                limit = settings.sources_reconnect_attempts
                if limit and failures > limit:
                    self._final = (FAILED, f"gave up after {limit} reconnects: {error.message}")
                    return
                delay = min(settings.sources_reconnect_max_s, settings.sources_reconnect_min_s * 2 ** (failures - 1))
                self.retry_at = time.time() + delay
                self.reconnects += 1
                self.ctx.metrics.source_reconnects.inc()
                self._set_state(RECONNECTING, error.message)
                if self._stop.wait(delay):
                    break
                self.retry_at = None
        except Exception:  # noqa: BLE001 - a bug here must still leave a truthful state
            log.exception("source %s: reader crashed", self.id)
            self._final = (FAILED, "internal error in the source reader")

    def _decode(self, container: Any) -> int:
        """Decode until the stream ends or the source stops; returns the frames decoded."""
        if not container.streams.video:
            raise SourceError("the source has no video stream", permanent=True)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        self._finite = bool(container.duration and container.duration > 0)  # a file or a VOD playlist
        self._check_size(stream.codec_context.width, stream.codec_context.height)
        rate = stream.average_rate or stream.guessed_rate
        self.source_fps = float(rate) if rate and 0 < float(rate) < 1000 else DEFAULT_FPS
        self._epoch += 1
        clock: tuple[float, float] | None = None  # (monotonic, stream time) of the pacing origin
        decoded = 0
        for frame in container.decode(stream):
            if self._stop.is_set():
                break
            self._check_size(frame.width, frame.height)
            if self.spec.realtime and frame.time is not None:
                now = time.monotonic()
                if clock is None or not -MAX_LEAD_S < frame.time - clock[1] - (now - clock[0]) < MAX_LEAD_S:
                    clock = (now, frame.time)
                elif self._stop.wait(max(clock[0] + frame.time - clock[1] - now, 0.0)):
                    break
            if decoded == 0:
                self._set_state(RUNNING)
            decoded += 1
            item = _Item(self.frames, frame, self._epoch, time.perf_counter(),
                         int((time.monotonic() - self._t0) * 1000))
            self.frames += 1
            if self.queue.put(item):
                self.dropped += 1
                self.ctx.metrics.frames_dropped.labels(reason="source_stale").inc()
        return decoded

    def _check_size(self, width: int, height: int) -> None:
        settings = self.ctx.settings
        if width and height:
            self.width, self.height = width, height
            if width * height > settings.max_width * settings.max_height:
                raise SourceError(f"{width}x{height} frames are over the limit of {settings.max_width}x"
                                  f"{settings.max_height} pixels (VSS_MAX_WIDTH, VSS_MAX_HEIGHT)", permanent=True)

    # --- worker ----------------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        epoch = 0
        try:
            while not self._stop.is_set():
                item = self.queue.get(timeout=0.1)
                if item is None:
                    if not self._reader.is_alive():
                        break  # the reader ended and every frame it left was segmented
                    continue
                try:
                    if item.epoch != epoch:
                        if epoch:
                            self._cut_sinks()
                        epoch = item.epoch
                        if self._segmenter is not None:
                            self._segmenter.reset()  # no warp across a reconnect: the next frame is a keyframe
                    self._process(item)
                except NotReady:
                    self.dropped += 1  # no model loaded yet
                except Exception as e:  # noqa: BLE001 - one bad frame must not end the source
                    log.exception("source %s: frame %d failed", self.id, item.index)
                    self.error = f"segmentation failed: {type(e).__name__}: {e}"
        finally:
            self._drift.close_stream(self._drift_id)
            self._router.close()
            self.queue.clear()
            self._close_sinks()
            self._reader.join()  # it never waits for the worker
            self._set_state(*self._final)  # only now: every frame was delivered, every sink file published
            with self._lock:
                self._finished = True
            self._broadcast(("end", self.state_message()))

    def _engine_segmenter(self, frame: np.ndarray) -> StreamSegmenter:
        """The segmenter on the engine routed to for ``frame``, as ``WS /v1/stream`` keeps it."""
        raw = self._router.pick(self.ctx.engine_manager.current(), frame)
        if raw is not self._raw_engine:
            self._raw_engine = raw
            engine = LockedEngine(raw, self.ctx.engine_lock)
            if self._segmenter is None:
                self._segmenter = StreamSegmenter(engine, self.ctx.flow(), self.spec.size)
            else:
                self._segmenter.engine = engine
        assert self._segmenter is not None
        return self._segmenter

    def _process(self, item: _Item) -> None:
        frame = item.frame.to_ndarray(format="rgb24")
        frame = apply_rotation(frame, normalize_rotation(item.frame.rotation))
        segmenter = self._engine_segmenter(frame)
        pending = segmenter.advance(frame)
        if self._router.on_base:  # the drift signal is the base version's (service/routing.py)
            self._drift.observe(self._drift_id, pending.model_version, pending.classes, pending.logits)
        result = pending.resolve()
        if self._sampler is not None:
            self._sampler.push(frame)
        metrics = self.ctx.metrics
        metrics.frames_segmented.labels(source="source").inc()
        metrics.inference_seconds.labels(stage="source_frame").observe(result.latency_ms / 1000.0)
        self.segmented += 1
        self.model_version = result.model_version
        self._times.append(time.monotonic())
        if self.spec.sinks:
            self._write_sinks(frame, result.labels, item.t_ms, segmenter.engine.meta["palette"])
        self._publish(item, result)

    def _publish(self, item: _Item, result: Any) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            return
        h, w = result.labels.shape
        meta = {"type": "frame", "frame": item.index, "model_version": result.model_version,
                "latency_ms": round((time.perf_counter() - item.received) * 1000.0, 2),
                "compute_ms": round(result.latency_ms, 2), "dropped": self.dropped,
                "class_fractions": result.class_fractions, "keyframe": result.keyframe, "width": w, "height": h}
        blobs: dict[str, bytes] = {}
        for subscriber in subscribers:
            if subscriber.format not in blobs:
                blobs[subscriber.format] = encode_labels(result.labels, subscriber.format)
            subscriber.offer(("frame", {**meta, "format": subscriber.format}, blobs[subscriber.format]))

    # --- sinks -----------------------------------------------------------------------------------------
    def _write_sinks(self, frame: np.ndarray, labels: np.ndarray, t_ms: int, palette: Any) -> None:
        settings = self.ctx.settings
        try:
            if not self.sinks:
                fps = self.source_fps or DEFAULT_FPS
                for kind in self.spec.sinks:
                    self.sinks[kind] = (
                        DiskSink(self.output / "disk", self.spec.segment_s, fps, settings.sources_segment_keep)
                        if kind == "disk" else
                        HlsSink(self.output / "hls", self.spec.segment_s, fps, settings.sources_hls_list_size))
            picture = overlay(frame, labels, np.asarray(palette, dtype=np.uint8))
            for sink in self.sinks.values():
                sink.write(picture, t_ms)
        except (OSError, av.error.FFmpegError, ValueError) as e:
            self.error = f"sink: {e}"
            log.warning("source %s: a sink failed: %s", self.id, e)

    def _cut_sinks(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.cut(discontinuity=True)
            except (OSError, av.error.FFmpegError, ValueError) as e:
                log.warning("source %s: cutting a segment failed: %s", self.id, e)

    def _close_sinks(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.close()
            except (OSError, av.error.FFmpegError, ValueError) as e:
                log.warning("source %s: closing a sink failed: %s", self.id, e)

    # --- reports ---------------------------------------------------------------------------------------
    def fps(self) -> float:
        """Frames segmented per second over the recent frames (0 when idle for a second)."""
        times = list(self._times)
        if len(times) < 2 or time.monotonic() - times[-1] > 1.0 + 2 * (times[-1] - times[0]) / (len(times) - 1):
            return 0.0
        return round((len(times) - 1) / max(times[-1] - times[0], 1e-6), 2)

    def public(self) -> dict[str, Any]:
        """The JSON body of ``GET /v1/sources/{id}``."""
        spec = self.spec
        with self._lock:
            subscribers = len(self._subscribers)
        sinks: dict[str, Any] = {}
        if "disk" in spec.sinks:
            disk = self.sinks.get("disk")
            sinks["disk"] = {"dir": str(self.output / "disk"), "segments": len(disk.segments) if disk else 0}
        if "hls" in spec.sinks:
            hls = self.sinks.get("hls")
            sinks["hls"] = {"playlist": f"/v1/sources/{self.id}/hls/index.m3u8",
                            "segments": len(hls.segments) if hls else 0}
        retry = None if self.retry_at is None or self.state != RECONNECTING else max(self.retry_at - time.time(), 0)
        return {"id": self.id, "name": spec.name, "url": redact(spec.url), "state": self.state, "error": self.error,
                "created": self.created, "frames": self.frames, "frames_segmented": self.segmented,
                "dropped": self.dropped, "fps": self.fps(), "source_fps": round(self.source_fps, 3),
                "width": self.width, "height": self.height, "reconnects": self.reconnects,
                "retry_in_s": None if retry is None else round(retry, 2), "model_version": self.model_version,
                "subscribers": subscribers, "sinks": sinks,
                "options": {"size": list(spec.size) if spec.size else None, "collect": spec.collect,
                            "sinks": list(spec.sinks), "segment_s": spec.segment_s, "on_end": spec.on_end,
                            "realtime": spec.realtime}}
