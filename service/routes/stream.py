"""``WS /v1/stream`` (also ``/stream``): segment a live stream of frames over one websocket.

Protocol (``docs/streaming.md`` has the same text with client examples):

1. The client sends one **text** message, a JSON config::

       {"format": "png" | "rle",          # label-map encoding of the replies (default "png")
        "size": [h, w],                   # optional label-map size (default: each frame's own size)
        "collect": true | false,          # let sampled frames feed the clip buffer (default true)
        "raw": {"width": W, "height": H}} # optional: frames are headerless RGB24 of this size

   The server answers ``{"type": "ready", "model_version", "classes", "palette", "queue", "input_size"}``.
2. The client sends frames as **binary** messages, one frame each: JPEG or PNG bytes; or raw RGB24
   with a 12-byte header ``b"RGB3"`` + uint32 LE width + uint32 LE height, then ``width*height*3``
   bytes row-major; or, when the config declared ``raw``, exactly ``W*H*3`` bytes with no header.
3. For each processed frame the server sends a **text** JSON message::

       {"type": "frame", "frame": i, "model_version": "v0002", "latency_ms": 41.2, "compute_ms": 38.0,
        "dropped": 0, "class_fractions": {"road": 0.31, ...}, "keyframe": false,
        "width": w, "height": h, "format": "png"}

   ``frame`` is the 0-based index of the client's frame (counting every binary message received),
   ``latency_ms`` is receive-to-reply time on the server (queueing included), ``compute_ms`` the
   segmentation itself, ``dropped`` the total of frames dropped so far, ``keyframe`` true when no
   cached t-1 logits were used (first frame, or the model version changed). It is followed by one
   **binary** message with the label map (class index per pixel):

   - ``png``: an 8-bit greyscale PNG;
   - ``rle``: ``b"RLE1"``, uint32 LE height, uint32 LE width, uint32 LE n; then n uint32 LE run
     lengths; then n uint8 class values: the row-major label array is ``repeat(values, lengths)``.

Overload: frames wait in a queue of ``ws_queue_size``; when it is full the **oldest** waiting frame
is dropped (counted in ``dropped`` and in ``vss_frames_dropped_total``), so memory stays bounded and
the server always works on the freshest frames. Each connection keeps the previous frame's logits
(one network forward per frame); every frame uses the registry's current engine, and after a swap
the next frame is a keyframe of the new version. When the registry holds per-domain versions
(``service.routing``), each frame is served by the version whose domain signature is nearest to the
stream's (``model_version`` says which); a change of version is a keyframe too. With ``batch_max`` > 1
the network call of a frame may run in one batch with other streams' and uploads' frames
(``service.batcher``); replies are unchanged.

Errors: the server sends ``{"type": "error", "error": {"code", "message"}}`` and closes with 1003
(unsupported data: a text message where a frame is expected, an undecodable image), 1007 (invalid
payload: bad config JSON or fields, a config over 4096 characters or nested too deeply, a raw frame
of the wrong size), 1008 (policy: a frame, or the label maps of the config's ``size``, over the pixel
budget ``max_pixels``) or 1009 (message too big: a message over ``ws_max_message_bytes``; ``vss serve``
has uvicorn enforce it while the message arrives, which closes with 1009 before any JSON error can be
sent); 1013 before a model is loaded and 1011 for a server-side failure.

Draining (``service.drain``): when the server is told to stop (SIGTERM), the stream finishes the frame in
hand, sends ``{"type": "error", "error": {"code": "draining", ...}, "last_frame": N}`` (``N``: the last frame
answered, null if none) and closes with 1012 (service restart). Reconnect (the load balancer sends you to
another replica) and resend from frame ``N + 1``: the first frame of the new connection is a keyframe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool
from starlette.types import Message

from models.flow import build_flow

from ..budget import BudgetExceeded, budget
from ..collect import provenance
from ..deps import (ApiError, get_adaptation, get_data_plane, get_drain, get_drift, get_engine_manager, get_metrics,
                    get_routes, get_settings)
from ..segment_jobs import LockedEngine
from ..engine_manager import NotReady
from ..stream_segmenter import StreamSegmenter
from ..stream_codec import (CLOSE_INTERNAL, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, CLOSE_UNSUPPORTED, StreamConfig,
                            StreamError, close_reason, decode_frame, encode_labels, parse_config,
                            precheck_frame)

log = logging.getLogger(__name__)
router = APIRouter(tags=["stream"])

CLOSE_SERVICE_RESTART = 1012  # the server is draining: reconnect, another replica takes the stream
DRAINING = StreamError(CLOSE_SERVICE_RESTART, "draining", "the server is shutting down: reconnect and resend "
                       "from frame last_frame + 1 (the first frame of the new connection is a keyframe)")


@dataclass
class _Item:
    index: int
    data: bytes
    received: float


class DropOldestQueue:
    """A bounded FIFO for one connection: ``put`` drops the oldest item when full and says so."""

    def __init__(self, size: int) -> None:
        self._items: deque[Any] = deque()
        self.size = size
        self._ready = asyncio.Event()
        self.final: Any = None  # a terminal event (StreamError or disconnect), never dropped

    def put(self, item: Any) -> bool:
        dropped = len(self._items) >= self.size
        if dropped:
            self._items.popleft()
        self._items.append(item)
        self._ready.set()
        return dropped

    def finish(self, event: Any) -> None:
        self.final = event
        self._ready.set()

    async def get(self) -> Any:
        """The oldest waiting item; the terminal event once it is set (waiting frames are abandoned)."""
        while True:
            if self.final is not None:
                return self.final
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            await self._ready.wait()


class _Disconnected:
    pass


class _Draining:
    pass


class StreamSession:
    """One websocket: a receiver task fills the queue, ``run`` segments and replies."""

    def __init__(self, ws: WebSocket, config: StreamConfig, drained: asyncio.Future[None]) -> None:
        self.ws, self.config = ws, config
        self.drained = drained  # done when the server starts draining
        self.last_frame: int | None = None  # index of the last frame whose reply was handed to the sender
        self.settings, self.metrics = get_settings(ws), get_metrics(ws)
        self.budget = budget(self.settings)
        self.manager = get_engine_manager(ws)
        plane = get_data_plane(ws)
        self.lock, self.batcher = plane.engine_lock, plane.batcher
        self.queue = DropOldestQueue(self.settings.ws_queue_size)
        self.dropped = 0
        self._raw_engine: Any = None
        self.segmenter: StreamSegmenter | None = None
        self.flow = build_flow(self.settings.flow,
                               str(self.settings.raft_weights) if self.settings.raft_weights else None)
        prov = provenance(ws, self.settings, "/v1/stream")
        # Each frame is decoded completely before it is segmented (an undecodable one ends the stream),
        # so a stream's clips are handed over as soon as they are complete.
        self.sampler = get_adaptation(ws).sampler("stream", prov) if config.collect else None
        self.frames_counter = self.metrics.frames_segmented.labels(source="stream")
        self.drops_counter = self.metrics.frames_dropped.labels(reason="stale")
        self.seconds = self.metrics.inference_seconds.labels(stage="stream_frame")
        self.drift = get_drift(ws)  # service/drift.py: this stream's and the process's drift signal
        self.drift_id = self.drift.open_stream()
        self.router = get_routes(ws).open(self.drift_id)  # service/routing.py: which version serves this stream

    async def receive(self) -> None:
        """Read frames until the client leaves or breaks the protocol; never blocks on inference."""
        index = 0
        max_pixels = self.budget.max_pixels
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.queue.finish(_Disconnected())
                    return
                data = message.get("bytes")
                if data is None:
                    raise StreamError(CLOSE_UNSUPPORTED, "unexpected_text",
                                      "expected a binary frame message; the config is sent only once")
                try:
                    self.budget.check_message(len(data))
                except BudgetExceeded as e:
                    raise StreamError(CLOSE_TOO_BIG, e.code, e.message) from e
                precheck_frame(data, self.config, max_pixels)
                if self.queue.put(_Item(index, data, time.perf_counter())):
                    self.dropped += 1
                    self.drops_counter.inc()
                index += 1
        except StreamError as e:
            self.queue.finish(e)
        except (WebSocketDisconnect, RuntimeError):
            self.queue.finish(_Disconnected())

    def _segmenter(self, raw: Any) -> StreamSegmenter:
        """The segmenter on ``raw``, the engine routed to for this frame (a different version: a keyframe)."""
        if raw is not self._raw_engine:
            self._raw_engine = raw
            engine = LockedEngine(raw, self.lock, self.batcher)  # the network call may join other streams' batch
            if self.segmenter is None:
                self.segmenter = StreamSegmenter(engine, self.flow, self.config.size)
            else:
                self.segmenter.engine = engine
        assert self.segmenter is not None
        return self.segmenter

    def process(self, item: _Item) -> tuple[dict[str, Any], bytes]:
        """Decode, segment and encode one frame (worker thread)."""
        frame = decode_frame(item.data, self.config, self.budget.max_pixels)
        pending = self._segmenter(self.router.pick(self.manager.current(), frame)).advance(frame)
        if self.router.on_base:  # the drift signal is the base version's (service/routing.py)
            self.drift.observe(self.drift_id, pending.model_version, pending.classes, pending.logits)
        result = pending.resolve()
        blob = encode_labels(result.labels, self.config.format)
        if self.sampler is not None:
            self.sampler.push(frame)
        self.frames_counter.inc()
        self.seconds.observe(result.latency_ms / 1000.0)
        h, w = result.labels.shape
        meta = {"type": "frame", "frame": item.index, "model_version": result.model_version,
                "latency_ms": round((time.perf_counter() - item.received) * 1000.0, 2),
                "compute_ms": round(result.latency_ms, 2), "dropped": self.dropped,
                "class_fractions": result.class_fractions, "keyframe": result.keyframe,
                "width": w, "height": h, "format": self.config.format}
        return meta, blob

    async def _send(self, meta: dict[str, Any], blob: bytes) -> bool:
        """Send one reply (JSON, then the label map); False if the client has left."""
        try:
            await self.ws.send_text(json.dumps(meta))
            await self.ws.send_bytes(blob)
            return True
        except (WebSocketDisconnect, RuntimeError):
            return False

    async def run(self) -> None:
        """Segment queued frames one at a time; each reply is sent while the next frame is segmented."""
        receiver = asyncio.create_task(self.receive())
        self.drained.add_done_callback(self._on_drain)
        sending: asyncio.Task[bool] | None = None
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, _Disconnected):
                    return
                if isinstance(item, _Draining):  # waiting frames are abandoned; last_frame tells the client
                    if sending is None or await sending:
                        await close_with_error(self.ws, DRAINING, {"last_frame": self.last_frame})
                    return
                try:
                    if isinstance(item, StreamError):
                        raise item
                    meta, blob = await run_in_threadpool(self.process, item)
                except StreamError as e:
                    if sending is None or await sending:
                        await close_with_error(self.ws, e)
                    return
                except Exception:  # a server-side failure: say so and close, never leave the client hanging
                    log.exception("stream frame %s failed", getattr(item, "index", "?"))
                    if sending is None or await sending:
                        await close_with_error(self.ws, StreamError(CLOSE_INTERNAL, "internal_error",
                                                                    "internal server error"))
                    return
                if sending is not None and not await sending:
                    return  # the client left
                meta["dropped"] = self.dropped
                self.last_frame = meta["frame"]
                sending = asyncio.create_task(self._send(meta, blob))
        finally:
            self.drift.close_stream(self.drift_id)
            self.router.close()
            receiver.cancel()
            if sending is not None and not sending.done():
                sending.cancel()

    def _on_drain(self, drained: asyncio.Future[None]) -> None:
        if not drained.cancelled() and self.queue.final is None:
            self.queue.finish(_Draining())


async def receive_unless_draining(ws: WebSocket, drained: asyncio.Future[None]) -> Message | None:
    """The next message, or None when the server starts draining first."""
    receiving = asyncio.ensure_future(ws.receive())
    await asyncio.wait({receiving, drained}, return_when=asyncio.FIRST_COMPLETED)
    if receiving.done():
        return receiving.result()
    receiving.cancel()
    return None


async def close_with_error(ws: WebSocket, error: StreamError, extra: dict[str, Any] | None = None) -> None:
    """Tell the client what went wrong (``extra``: more top-level keys), then close with the error's code."""
    try:
        body = {"type": "error", "error": {"code": error.code, "message": error.message}, **(extra or {})}
        await ws.send_text(json.dumps(body))
        await ws.close(error.close_code, reason=close_reason(error.message))
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client is already gone


@router.get("/v1/stream", summary="WebSocket: segment a live stream of frames (protocol)", status_code=426,
            responses={426: {"description": "this URL speaks the websocket protocol only"}})
def stream_protocol() -> None:
    raise ApiError(426, "upgrade_required", "connect with a websocket client to ws://HOST/v1/stream; the protocol "
                                            "is in the API docs", {"Upgrade": "websocket"})


stream_protocol.__doc__ = "Connect with a **websocket** client. " + (__doc__ or "").split("\n", 2)[2]


@router.websocket("/v1/stream", name="stream")
@router.websocket("/stream")
async def stream(ws: WebSocket) -> None:
    """Live segmentation of a frame stream; the protocol is in this module's docstring."""
    await ws.accept()
    metrics = get_metrics(ws)
    metrics.stream_sessions.inc()
    drained = get_drain(ws).started()
    try:
        settings = get_settings(ws)
        try:
            first = await receive_unless_draining(ws, drained)
            if first is None:
                await close_with_error(ws, DRAINING, {"last_frame": None})
                return
            if first["type"] == "websocket.disconnect":
                return
            config = parse_config(first, budget(settings).max_pixels)
        except StreamError as e:
            await close_with_error(ws, e)
            return
        except WebSocketDisconnect:
            return
        try:
            engine = get_engine_manager(ws).current()
        except NotReady:
            await close_with_error(ws, StreamError(CLOSE_TRY_AGAIN, "not_ready",
                                                   "no model is loaded yet; retry shortly"))
            return
        session = StreamSession(ws, config, drained)
        await ws.send_text(json.dumps({
            "type": "ready", "model_version": engine.version, "classes": list(engine.meta["classes"]),
            "palette": [list(map(int, c)) for c in engine.meta["palette"]], "queue": session.queue.size,
            "input_size": list(engine.meta["input_size"])}))
        await session.run()
    finally:
        drained.cancel()  # no-op once draining began; otherwise forget this stream
        metrics.stream_sessions.dec()
