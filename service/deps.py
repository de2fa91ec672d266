"""Dependencies shared by all routes: app state accessors, the API-key guard and the error type.

``app.state`` holds the parts ``service.components.build_components`` built (``create_app`` sets them all
before the app serves; there is nothing lazy to probe for). Routes never import app singletons; they
declare what they need::

    @router.post("/v1/thing", dependencies=[RequireApiKey])
    def thing(engine: EngineDep, settings: SettingsDep, metrics: MetricsDep) -> ...

Every 4xx/5xx response body is ``{"error": {"code": ..., "message": ...}}``: raise ``ApiError``.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from .components import AdaptationPlane
from .drain import Drain
from .drift import DriftMonitor
from .engine import Engine
from .segment_jobs import DataPlane
from .engine_manager import EngineManager, NotReady
from .metrics import Metrics
from .registry_api import Registry
from .routing import DomainRoutes
from .settings import Settings
from .sources.manager import SourceManager


class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.details = status, code, message, headers, details


def get_settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


def get_registry(conn: HTTPConnection) -> Registry:
    return conn.app.state.registry


def get_engine_manager(conn: HTTPConnection) -> EngineManager:
    return conn.app.state.engine_manager


def get_metrics(conn: HTTPConnection) -> Metrics:
    return conn.app.state.metrics


def get_drain(conn: HTTPConnection) -> Drain:
    return conn.app.state.drain


def get_drift(conn: HTTPConnection) -> DriftMonitor:
    return conn.app.state.drift


def get_routes(conn: HTTPConnection) -> DomainRoutes:
    return conn.app.state.routes


def get_data_plane(conn: HTTPConnection) -> DataPlane:
    return conn.app.state.data_plane


def get_adaptation(conn: HTTPConnection) -> AdaptationPlane:
    return conn.app.state.adaptation


def get_sources(conn: HTTPConnection) -> SourceManager:
    return conn.app.state.sources


def get_engine(conn: HTTPConnection) -> Engine:
    """The live engine at the start of the request; the request keeps it even if a swap happens."""
    try:
        return get_engine_manager(conn).current()
    except NotReady as e:
        raise ApiError(503, "not_ready", "no model is loaded yet; retry shortly", {"Retry-After": "1"}) from e


def check_api_key(settings: Settings, token: str | None) -> None:
    """Raise 401 (no token) or 403 (wrong token) when an API key is configured; usable outside HTTP deps."""
    expected = settings.api_key_value()
    if expected is None:
        return
    if not token:
        raise ApiError(401, "unauthorized", "this route needs 'Authorization: Bearer <VSS_API_KEY>'",
                       {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(403, "forbidden", "invalid API key")


_bearer = HTTPBearer(auto_error=False, description="The server's VSS_API_KEY (only when one is set)")


def require_api_key(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Guard for mutating routes: a no-op when ``VSS_API_KEY`` is unset."""
    check_api_key(get_settings(request), credentials.credentials if credentials else None)


# The answers of ``RequireApiKey``, for the ``responses=`` of the routes that use it (the OpenAPI schema).
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing API key (the server has `VSS_API_KEY`)"},
    403: {"description": "wrong API key"},
}

SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
EngineManagerDep = Annotated[EngineManager, Depends(get_engine_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
DriftDep = Annotated[DriftMonitor, Depends(get_drift)]
RoutesDep = Annotated[DomainRoutes, Depends(get_routes)]
DataPlaneDep = Annotated[DataPlane, Depends(get_data_plane)]
AdaptationDep = Annotated[AdaptationPlane, Depends(get_adaptation)]
SourcesDep = Annotated[SourceManager, Depends(get_sources)]
RequireApiKey = Depends(require_api_key)
