"""The FastAPI application factory. Everything is built inside ``create_app``; nothing at import.

``create_app`` builds every part of the app eagerly (``service.components.build_components``) and puts
each on ``app.state``: ``settings``, ``metrics``, ``registry`` (model versions), ``engine_manager`` (the
only owner of the live engine), ``drain`` (``service.drain``: begun by ``vss serve`` on SIGTERM),
``drift`` (the drift signal), ``data_plane`` (upload jobs, the engine lock, the batcher), ``adaptation``
(clip buffer, collection, adaptation jobs, the worker supervisor) and ``sources``. Routes reach them
through ``service.deps``. The app has one lifespan, ``Components.running``, which starts them in order
and stops them in reverse. Run it with ``vss serve`` or ``uvicorn --factory service.app:create_app``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import routes
from .budget import MAX_JSON_BODY_BYTES, document_limits
from .components import build_components
from .deps import ApiError
from .drain import RETRY_AFTER_S, DrainMiddleware
from .engine_manager import EngineFactory
from .metrics import REQUEST_ID_HEADER, Metrics, new_request_id, request_id_var, request_log_level
from .redact import redact
from .routes import sources as sources_routes
from .storage import StoreError
from .settings import Settings

log = logging.getLogger("vss.http")

DESCRIPTION = """
**vss** segments videos semantically (road, sidewalk, building, ...) with an ACCEL-style video model
(per-frame DeepLabV2 + optical-flow warp of the previous frame's scores + 1x1 fusion) and adapts the
served model to the videos it receives, swapping improved versions in without dropping a request.

* **Segment** an uploaded video (`POST /v1/segment`) or a live stream of frames (`WS /v1/stream`).
* **Models**: every version lives in a registry directory (`v0001/`, `v0002/`, ...). `GET /v1/models`
  lists them; `POST /v1/models/{version}/activate` deploys or rolls back (all replicas sharing the
  directory follow).
* **Operations**: `/healthz` (liveness), `/readyz` (a warmed-up model serves), `/metrics` (Prometheus).

Mutating routes need `Authorization: Bearer <VSS_API_KEY>` when the server has a key. Every error is
`{"error": {"code": "...", "message": "..."}}`; every response carries an `X-Request-ID`.
"""

OPENAPI_TAGS = [
    {"name": "segment", "description": "Segment uploaded videos; long ones run as jobs."},
    {"name": "stream", "description": "Segment a live stream of frames over a websocket."},
    {"name": "models", "description": "Model versions in the registry: list, inspect, activate, roll back."},
    {"name": "operations", "description": "Liveness, readiness and Prometheus metrics."},
    {"name": "web", "description": "The browser page and what it needs."},
]

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "too_many_requests", 500: "internal_error", 503: "unavailable"}


def error_body(status: int, code: str | None, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code or ERROR_CODES.get(status, "http_error"), "message": redact(message)}
    if details is not None:
        error["details"] = details
    request_id = request_id_var.get()
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app. ``engine_factory`` replaces the torch/ONNX factory (tests inject fakes)."""
    settings = settings if settings is not None else Settings()
    parts = build_components(settings, engine_factory)
    if settings.intra_op_threads and settings.engine == "torch":
        import torch

        # Process-wide: threads that have not run torch ops yet (the inference threads) inherit it.
        torch.set_num_threads(settings.intra_op_threads)

    app = FastAPI(title="vss", summary="Video semantic segmentation that adapts itself to your videos",
                  description=DESCRIPTION, version=_version(), openapi_tags=OPENAPI_TAGS,
                  lifespan=lambda _app: parts.running(),  # the one lifespan: start in order, stop in reverse
                  docs_url=None, redoc_url=None)  # routes/docs.py serves both without a CDN
    for part in fields(parts):  # app.state.settings, .metrics, ..., .sources: what service.deps reads
        setattr(app.state, part.name, getattr(parts, part.name))
    _add_error_handlers(app)
    app.add_middleware(DrainMiddleware, drain=parts.drain, refusal=_draining_response)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(BodyBudgetMiddleware, max_bytes=MAX_JSON_BODY_BYTES)
    app.add_middleware(RequestContextMiddleware, metrics=parts.metrics)
    for router in routes.routers():
        app.include_router(router)
    app.include_router(sources_routes.router)  # server-side sources (README "Server-side sources")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_limits(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _draining_response() -> JSONResponse:
    message = "this server is shutting down; retry: the load balancer sends you to another replica"
    return JSONResponse(error_body(503, "draining", message), 503,
                        {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vss")
    except PackageNotFoundError:
        return "0.1.0"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.code, exc.message, exc.details), exc.status, exc.headers)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # The model store (S3) is down or refused a request: the route's work cannot be done right now.
        return JSONResponse(error_body(503, "store_unavailable", str(exc)), 503, {"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, None, str(exc.detail)), exc.status_code,
                            getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_details(exc.errors())
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(422, "invalid_request", message, errors), 422)


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats (NaN, Infinity) as strings, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's errors as the 422 ``details``: where, what and the limit (``ctx``), never the input itself
    (it may be large, or a NaN that JSON cannot carry)."""
    out = []
    for error in errors:
        entry = {k: error[k] for k in ("type", "loc", "msg", "ctx") if k in error}
        out.append(_finite(jsonable_encoder(entry, custom_encoder={Exception: str})))
    return out


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``: FastAPI's body reader lets HTTP exceptions through to the 413 handler."""


class BodyBudgetMiddleware:
    """413 for a request body over ``max_bytes`` that is not ``multipart/form-data`` (uploads have their own,
    larger limit, enforced while they stream to disk): a declared ``Content-Length`` is refused before the
    body is read, a chunked body as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if headers is None or headers.get("content-type", "").lower().startswith("multipart/form-data"):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        received, started = 0, False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge(413, f"the request body is larger than the limit of {self.max_bytes} bytes")
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than the limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(413, "payload_too_large", message), 413)(scope, receive, send)


class RequestContextMiddleware:
    """Request ids (``X-Request-ID`` in and out), per-route metrics, one JSON log line per request,
    and a JSON 500 for unhandled exceptions (logged with the request id, never a traceback to the client).

    Pure ASGI (not ``BaseHTTPMiddleware``), so streaming responses and websockets pass through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = new_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        is_http = scope["type"] == "http"
        state = {"status": 500 if is_http else 1000, "started": False}
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), header]}
                state["started"] = True
                if kind == "http.response.start":
                    state["status"] = message["status"]
            elif kind == "websocket.close":
                state["status"] = message.get("code", 1000)
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            state["status"] = 500 if is_http else 1011
            log.exception("unhandled error in %s %s", scope.get("method", "WS"), scope.get("path"))
            if not is_http or state["started"]:
                raise
            response = JSONResponse(error_body(500, "internal_error", "internal server error"), 500)
            await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, state["status"], time.perf_counter() - started)
            request_id_var.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "WS")
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(seconds)
        level = request_log_level(method, route, status, scope["type"] == "http")
        log.log(level, "%s %s %s", method, scope.get("path"), status,
                extra={"method": method, "path": scope.get("path"), "route": route, "status": status,
                       "duration_ms": round(seconds * 1000, 2),
                       "client": (scope.get("client") or ("", 0))[0]})
