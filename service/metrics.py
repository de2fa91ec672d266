"""Observability: Prometheus metrics (one ``CollectorRegistry`` per app), request ids, JSON-lines logs.

Every metric of the service is defined here. Other modules record through the ``Metrics`` object on
``app.state.metrics`` (``service.deps.get_metrics``):
``metrics.frames_segmented.labels(source="upload").inc(n)``, ``metrics.frames_dropped.labels(
reason="stale").inc()``, ``metrics.inference_seconds.labels(stage="frame").observe(dt)``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .storage import STORE_ERRORS, STORE_OPS

if TYPE_CHECKING:
    from .drift import DriftMonitor
    from .engine_manager import EngineManager

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vss_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})  # logged at debug level only
# What clients (the web page, vss_client) poll: successful GETs are logged at debug level only.
POLL_ROUTES = frozenset({"/v1/jobs/{job_id}", "/v1/adapt", "/v1/adapt/{job_id}", "/v1/models", "/v1/models/active",
                         "/v1/clips", "/v1/sources", "/v1/sources/{source_id}",
                         "/v1/sources/{source_id}/hls/{name}"})  # HLS players fetch the playlist every few s


class Metrics:
    """All metric series of one app, registered in a private registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vss_http_requests_total", "HTTP requests and websocket sessions by route",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("vss_http_request_duration_seconds", "Request latency by route (websockets: "
                                 "session length)", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("vss_http_requests_in_flight", "Requests being served", registry=r)
        self.frames_segmented = Counter("vss_frames_segmented_total", "Frames segmented", ["source"], registry=r)
        self.frames_dropped = Counter("vss_frames_dropped_total", "Frames dropped (e.g. stale stream frames)",
                                      ["reason"], registry=r)
        self.inference_seconds = Histogram("vss_inference_seconds", "Engine time per call", ["stage"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.stream_sessions = Gauge("vss_stream_sessions", "Open websocket stream sessions", registry=r)
        self.sources = Gauge("vss_sources", "Server-side sources (POST /v1/sources) by state", ["state"], registry=r)
        self.source_reconnects = Counter("vss_source_reconnects_total", "Reconnects of server-side sources "
                                         "after a drop or a failed connect", registry=r)
        self.buffer_clips_added = Counter("vss_buffer_clips_added_total", "Clips added to the adaptation clip "
                                          "buffer", ["source"], registry=r)
        self.buffer_clips_refused = Counter("vss_buffer_clips_refused_total", "Sampled clips not added to the clip "
                                            "buffer", ["reason"], registry=r)
        self.frames_segmented.labels(source="source")
        self.frames_dropped.labels(reason="source_stale")
        for source in ("upload", "stream"):  # export the series at 0 before the first frame
            self.frames_segmented.labels(source=source)
        self.frames_dropped.labels(reason="stale")

    def watch_engine(self, manager: EngineManager) -> None:
        """Export the manager's active version, swap and failure counters at scrape time."""
        self.registry.register(_EngineCollector(manager))

    def watch_drift(self, monitor: DriftMonitor) -> None:
        """Export the drift signal (``service/drift.py``) at scrape time."""
        self.registry.register(_DriftCollector(monitor))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Reads the engine manager's state when Prometheus scrapes (no bookkeeping on the hot path)."""

    def __init__(self, manager: EngineManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Any]:
        m = self.manager
        engine = m.peek()
        info = InfoMetricFamily("vss_model", "The model version this process serves")
        if engine is not None:
            info.add_metric([], {"version": engine.version, "backend": engine.backend,
                                 "active_pointer": _safe_active(m) or ""})
        yield info
        active = GaugeMetricFamily("vss_model_active", "1 for the version being served", labels=["version"])
        if engine is not None:
            active.add_metric([engine.version], 1.0)
        yield active
        provider = GaugeMetricFamily("vss_model_provider", "1 for what runs the served model: the ONNX Runtime "
                                     "execution provider that really took it, or torch's device", labels=["provider"])
        if engine is not None:
            provider.add_metric([engine.provider], 1.0)
        yield provider
        yield GaugeMetricFamily("vss_model_ready", "1 once a warmed-up model serves", value=float(engine is not None))
        yield CounterMetricFamily("vss_model_swaps", "Hot swaps to another model version", value=m.swaps)
        yield CounterMetricFamily("vss_model_swap_failures", "Model versions that failed to load",
                                  value=m.swap_failures)
        yield GaugeMetricFamily("vss_model_loaded_timestamp_seconds", "When the serving version was loaded",
                                value=m.loaded_at or 0.0)
        yield CounterMetricFamily("vss_registry_poll_errors", "Polls that could not read the ACTIVE pointer",
                                  value=m.pointer_errors)
        errors = CounterMetricFamily("vss_store_errors", "Failed object store requests (unreachable, 5xx, "
                                     "auth) in this process, by operation", labels=["op"])
        for op, count in sorted({**dict.fromkeys(STORE_OPS, 0), **STORE_ERRORS.snapshot()}.items()):
            errors.add_metric([op], count)
        yield errors


class _DriftCollector(Collector):
    """Exports the monitor at scrape time: ``vss_drift_*{scope="process"|"stream", stream=""|"s3"}``."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        snap = self.monitor.snapshot()
        ref = snap["reference"]
        yield GaugeMetricFamily("vss_drift_reference_frames", "Frames in the active version's drift reference so far",
                                value=float(ref["frames"]) if ref else 0.0)
        families = {
            "entropy": GaugeMetricFamily("vss_drift_entropy", "EMA of the mean normalised prediction entropy",
                                         labels=["scope", "stream"]),
            "entropy_delta": GaugeMetricFamily("vss_drift_entropy_delta", "EMA entropy minus the reference entropy",
                                               labels=["scope", "stream"]),
            "class_tv": GaugeMetricFamily("vss_drift_class_tv", "Total variation between the EMA class distribution "
                                          "and the reference one", labels=["scope", "stream"]),
        }
        scopes = [("process", "", snap["process"])] + [("stream", sid, s) for sid, s in snap["streams"].items()]
        for scope, sid, values in scopes:
            for key, family in families.items():
                if values[key] is not None:
                    family.add_metric([scope, sid], float(values[key]))
        yield from families.values()


def _safe_active(manager: EngineManager) -> str | None:
    """The pointer as the watcher last read it (a scrape never waits on the file system or the store)."""
    return manager.pointer


def new_request_id(incoming: str | None) -> str:
    """Keep a well-formed incoming id (so ids follow a request across services), else make one."""
    if incoming and _VALID_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


# --- logging ---------------------------------------------------------------------------------
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                               "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def request_log_level(method: str, route: str, status: int, is_http: bool) -> int:
    """The level of a request's log line: debug for probes and for successful polls, warnings and errors
    for server-side failures, info otherwise."""
    if route in QUIET_ROUTES or (method == "GET" and route in POLL_ROUTES and status < 400):
        return logging.DEBUG
    if status >= 500 and is_http:
        return logging.WARNING if status == 503 else logging.ERROR  # 503: not ready / overloaded
    return logging.INFO


class TextFormatter(logging.Formatter):
    """For people at a terminal: ``12:00:01 INFO  vss.app: POST /v1/segment 202 (812 ms)``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        duration = record.__dict__.get("duration_ms")
        return text if duration is None else f"{text} ({duration:.0f} ms)"


def configure_logging(level: str = "info", json_lines: bool | None = True) -> None:
    """Route all logs (ours, uvicorn's, libraries') to stderr; called by ``vss serve``, not at import.

    ``json_lines=None``: JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
