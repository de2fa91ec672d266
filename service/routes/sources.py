"""Server-side sources: the server pulls an RTSP / HTTP(S) / file URL, segments it, and offers the results.

- ``POST /v1/sources`` ``{"url", "name", "size", "collect", "sinks", "segment_s", "on_end", "realtime"}``
  → 201 with the source; 403 when the allow-list refuses the URL (the reason says why), 422 for a
  malformed URL or options, 409 past ``VSS_SOURCES_MAX``.
- ``GET /v1/sources`` (all, and the allow-list), ``GET /v1/sources/{id}`` (state: connecting, running,
  reconnecting, failed, stopped; frames, fps, last error, sinks), ``DELETE /v1/sources/{id}``.
- ``WS /v1/sources/{id}/results?format=png|rle``: a ``ready`` message, then per segmented frame the
  ``WS /v1/stream`` reply (a JSON ``frame`` message + the label map), ``state`` messages when the source
  changes state, and a last ``state`` message before the server closes (1000) when the source ended.
- ``GET /v1/sources/{id}/hls/{file}``: the HLS sink's ``index.m3u8`` and segments.

Every route needs ``Authorization: Bearer <VSS_API_KEY>`` when a key is set: a source makes the
server open a URL of the client's choosing.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from ..collect import provenance
from ..deps import (AUTH_ERRORS, ApiError, RequireApiKey, SourcesDep, check_api_key, get_engine_manager, get_settings,
                    get_sources)
from ..engine_manager import NotReady
from ..sources.feed import Subscriber
from ..sources.manager import TooManySources
from ..sources.policy import PolicyError
from ..sources.sinks import HlsSink
from ..sources.source import Source, SourceSpec
from ..stream_codec import CLOSE_INVALID, CLOSE_POLICY, FORMATS, StreamError
from .stream import close_with_error

HLS_FILE = re.compile(r"^(index\.m3u8|seg-\d{6}\.ts)$")
Side = Annotated[int, Field(ge=1, le=8192)]


router = APIRouter(tags=["sources"])  # the websocket checks the key itself
_http = APIRouter(tags=["sources"], dependencies=[RequireApiKey], responses=AUTH_ERRORS)


class SourceRequest(BaseModel):
    """A source to pull; every field but ``url`` is optional."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048, description="rtsp://, http(s):// (a video file, an HLS playlist, an "
                     "MJPEG stream) or file:// inside VSS_SOURCES_FILE_DIR")
    name: str | None = Field(None, max_length=100, description="a label for listings")
    size: tuple[Side, Side] | None = Field(None, description="[h, w] of the label maps (default: the frame's)")
    collect: bool = Field(False, description="sample frames into the adaptation clip buffer")
    sinks: list[Literal["disk", "hls"]] = Field(default_factory=list, max_length=2, description="write the "
                                                "overlay as MP4 segments to disk and/or as an HLS stream")
    segment_s: float = Field(4.0, ge=0.5, le=60.0, description="length of the sinks' segments")
    on_end: Literal["stop", "reconnect", "auto"] = Field("auto", description="when the stream ends: stop, "
                                                         "reconnect, or auto: stop if the stream declared a "
                                                         "duration (a file, a VOD playlist), else reconnect")
    realtime: bool | None = Field(None, description="pace decoding to the stream's clock (default: true "
                                  "except for rtsp, which is live anyway)")

    def spec(self) -> SourceSpec:
        live = self.url.lower().startswith("rtsp:")
        return SourceSpec(self.url, self.name, self.size, self.collect, tuple(dict.fromkeys(self.sinks)),
                          self.segment_s, self.on_end,
                          self.realtime if self.realtime is not None else not live)


def _source(conn: HTTPConnection, source_id: str) -> Source:
    source = get_sources(conn).get(source_id)
    if source is None:
        raise ApiError(404, "not_found", f"no source {source_id!r}")
    return source


@_http.post("/v1/sources", status_code=201, summary="Pull and segment a camera, stream or file",
             responses={403: {"description": "the allow-list refuses the URL (the message says why)"},
                        409: {"description": "VSS_SOURCES_MAX sources exist"},
                        422: {"description": "malformed URL or options"}})
async def create_source(body: SourceRequest, request: Request, manager: SourcesDep) -> dict[str, Any]:
    try:
        await run_in_threadpool(manager.policy.check, body.url)  # resolves host names: off the event loop
    except PolicyError as e:
        raise ApiError(e.status, e.code, e.message) from e
    try:
        source = manager.create(replace(body.spec(), provenance=provenance(request, manager.settings, "/v1/sources")))
    except TooManySources as e:
        if manager.settings.sources_max == 0:
            raise ApiError(403, "sources_off", str(e)) from e
        raise ApiError(409, "too_many_sources", str(e)) from e
    return source.public()


@_http.get("/v1/sources", summary="List the sources and the allow-list")
def list_sources(manager: SourcesDep) -> dict[str, Any]:
    return {"sources": [s.public() for s in manager.list()], "max": manager.settings.sources_max,
            "allowed": manager.policy.describe()}


@_http.get("/v1/sources/{source_id}", summary="A source's state, counters and sinks")
def get_source(source_id: str, request: Request) -> dict[str, Any]:
    return _source(request, source_id).public()


@_http.delete("/v1/sources/{source_id}", summary="Stop a source and free its resources")
async def delete_source(source_id: str, manager: SourcesDep) -> dict[str, Any]:
    source = await run_in_threadpool(manager.delete, source_id)
    if source is None:
        raise ApiError(404, "not_found", f"no source {source_id!r}")
    return source.public()


@_http.get("/v1/sources/{source_id}/hls/{name}", summary="The HLS sink: index.m3u8 and its segments",
            response_class=Response)
def hls_file(source_id: str, name: str, request: Request) -> FileResponse:
    source = _source(request, source_id)
    if "hls" not in source.spec.sinks or not HLS_FILE.fullmatch(name):
        raise ApiError(404, "not_found", f"source {source_id} has no HLS file {name!r}")
    path = source.output / "hls" / name
    if not path.is_file():
        raise ApiError(404, "not_found", f"{name} is not written yet" if name == HlsSink.PLAYLIST else
                       f"{name} is not (or no longer) in the playlist")
    playlist = name == HlsSink.PLAYLIST
    return FileResponse(path, media_type="application/vnd.apple.mpegurl" if playlist else "video/mp2t",
                        headers={"Cache-Control": "no-cache" if playlist else "max-age=60"})


@router.websocket("/v1/sources/{source_id}/results")
async def source_results(ws: WebSocket, source_id: str) -> None:
    """Results of a source, in the ``WS /v1/stream`` reply format (see the module docstring)."""
    await ws.accept()
    try:
        auth = ws.headers.get("authorization", "")
        check_api_key(get_settings(ws), auth[7:].strip() if auth.lower().startswith("bearer ") else None)
        source = _source(ws, source_id)
    except ApiError as e:
        await close_with_error(ws, StreamError(CLOSE_POLICY, e.code, e.message))
        return
    fmt = ws.query_params.get("format", "png")
    if fmt not in FORMATS:
        await close_with_error(ws, StreamError(CLOSE_INVALID, "invalid_config",
                                               f"format must be one of {list(FORMATS)}, got {fmt!r}"))
        return
    settings = get_settings(ws)
    subscriber = Subscriber(asyncio.get_running_loop(), fmt, settings.ws_queue_size)
    ready: dict[str, Any] = {"type": "ready", "source": source.id, "state": source.state,
                             "queue": subscriber.size, "format": fmt}
    try:
        engine = get_engine_manager(ws).current()
        ready.update(model_version=engine.version, classes=list(engine.meta["classes"]),
                     palette=[list(map(int, c)) for c in engine.meta["palette"]],
                     input_size=list(engine.meta["input_size"]))
    except NotReady:
        pass  # frames come once a model is loaded
    source.subscribe(subscriber)
    watcher = asyncio.create_task(_until_disconnect(ws))
    try:
        await ws.send_text(json.dumps(ready))
        while True:
            getter = asyncio.ensure_future(subscriber.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return  # the client left
            message = getter.result()
            if message[0] == "frame":
                meta = {**message[1], "dropped": message[1]["dropped"] + subscriber.dropped}
                await ws.send_text(json.dumps(meta))
                await ws.send_bytes(message[2])
            else:
                await ws.send_text(json.dumps(message[1]))
                if message[0] == "end":
                    await ws.close(1000)
                    return
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        watcher.cancel()
        source.unsubscribe(subscriber)


async def _until_disconnect(ws: WebSocket) -> None:
    """Read (and ignore) client messages until the client leaves."""
    try:
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    except (WebSocketDisconnect, RuntimeError):
        pass


router.include_router(_http)
