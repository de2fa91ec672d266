"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from ..deps import ApiError, EngineManagerDep, MetricsDep, get_drain

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model_version: str
    backend: str


@router.get("/healthz", summary="Liveness: the process is up")
def healthz() -> Health:
    """Always 200 while the process can answer; does not depend on the model."""
    return Health(status="ok")


@router.get("/readyz", summary="Readiness: a warmed-up model is serving",
            responses={503: {"description": "no model loaded yet, or the server is draining"}})
def readyz(request: Request, manager: EngineManagerDep) -> Ready:
    """200 once a model version is loaded and one warm-up inference ran; 503 before, and from the
    moment the server drains (SIGTERM) so that the load balancer stops routing here."""
    if get_drain(request).draining:
        raise ApiError(503, "draining", "this server is shutting down", {"Retry-After": "1"})
    engine = manager.peek()
    if engine is None:
        last = manager.last
        reason = f" (last attempt: {last.version} failed: {last.error})" if last and not last.ok else ""
        raise ApiError(503, "not_ready", f"no model version is loaded yet{reason}", {"Retry-After": "1"})
    return Ready(status="ready", model_version=engine.version, backend=engine.backend)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of this process's metrics."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
