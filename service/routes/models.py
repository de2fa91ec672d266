"""Model versions: list, inspect, see what is serving, activate (also the rollback route)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from models.checkpoint import CheckpointError
from models.signature import distance

from ..auto_rounds import auto_state
from ..deps import (AUTH_ERRORS, AdaptationDep, ApiError, DriftDep, EngineManagerDep, RegistryDep, RequireApiKey,
                    RoutesDep)
from ..engine_manager import EngineLoadError, EngineManager
from ..redact import redact
from ..domains import domain_of
from ..routing import DomainRoutes
from ..registry import InvalidVersion, RegistryError, VersionNotFound
from ..registry_api import Registry
from ..storage import StoreError
from ..store_registry import ActivationConflict
from .errors import disk_errors

router = APIRouter(prefix="/v1/models", tags=["models"])

# The registry checks the name (422 invalid_version); the schema states the same pattern.
VERSION = Annotated[str, Path(description="a version name: 'v' and at least four digits, e.g. v0001",
                              json_schema_extra={"pattern": "^v[0-9]{4,}$"}, examples=["v0001"])]


class ModelInfo(BaseModel):
    version: str = Field(examples=["v0002"])
    parent: str | None = Field(None, description="version this one was adapted from")
    created: str | None = None
    active: bool = Field(description="named by the registry's ACTIVE pointer")
    serving: bool = Field(description="served by the process that answered")
    classes: list[str] = []
    palette: list[list[int]] = []
    input_size: list[int] = Field([], description="(height, width) the model expects")
    architecture: dict[str, Any] = {}
    sha256: str | None = None
    has_onnx: bool = False
    provenance: dict[str, Any] = {}
    domain: DomainInfo | None = Field(None, description="the domain this version was adapted for (meta.json "
                                      "'domain'), if any")
    retired: bool = Field(False, description="taken out of per-domain routing (POST .../retire)")
    routable: bool = Field(False, description="has a domain, is not retired and not the active version: streams "
                                              "and uploads whose signature matches are served by it")
    routed: bool = Field(False, description="loaded for routing by the process that answered")
    error: str | None = Field(None, description="why the metadata could not be read, if it could not")


class DomainInfo(BaseModel):
    name: str = Field(examples=["night"])
    clips: int = Field(description="clips the version was adapted on")
    distance_to_base: float | None = Field(None, description="signature distance to the active version's own "
                                           "signature (models/signature.py units; null: the base's is unknown)")


class ModelList(BaseModel):
    active: str | None = Field(description="version named by ACTIVE")
    serving: str | None = Field(description="version this process serves (differs briefly during a swap)")
    versions: list[ModelInfo]


class LastSwap(BaseModel):
    version: str
    previous: str | None
    ok: bool
    seconds: float
    at: datetime
    error: str | None


class ServingModel(BaseModel):
    version: str
    backend: str = Field(examples=["torch", "onnxruntime"])
    provider: str = Field(description="what runs the network: the ONNX Runtime execution provider that really "
                                      "took the model (after any fallback), or torch's device",
                          examples=["CUDAExecutionProvider", "CPUExecutionProvider", "cuda", "cpu"])
    loaded_at: datetime | None
    swaps: int
    swap_failures: int
    last_swap: LastSwap | None
    model: ModelInfo
    drift: dict[str, Any] | None = Field(None, description="GET /v1/models/active only: the drift signal of this "
                                         "process and its open streams against the version's reference "
                                         "(service/drift.py)")
    routing: dict[str, Any] | None = Field(None, description="GET /v1/models/active only: the domain versions this "
                                           "process routes to and, per open stream, the version serving it and its "
                                           "signature distances to the base and to that version (service/routing.py)")
    auto: dict[str, Any] | None = Field(None, description="GET /v1/models/active only: the worker's auto policy "
                                        "(VSS_ADAPT_AUTO): its last decision, drifted clips, clusters, next eligible "
                                        "time and rounds started/published/rejected (service/auto_rounds.py)")


def _redacted(value: Any) -> Any:
    """Metadata as answered: strings without server paths (e.g. where a checkpoint was built)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _info(registry: Registry, version: str, active: str | None, serving: str | None,
          routing: RouteView | None = None) -> ModelInfo:
    flags = {"version": version, "active": version == active, "serving": version == serving}
    try:
        meta = registry.meta(version)
    except CheckpointError as e:
        return ModelInfo(**flags, error=redact(str(e)))
    provenance = _redacted(dict(meta.get("provenance") or {}))
    domain, view = domain_of(meta), routing or RouteView()
    info = None if domain is None else DomainInfo(
        name=domain.name, clips=domain.clips, distance_to_base=None if view.base_signature is None else
        round(distance(domain.signature, view.base_signature), 4))
    return ModelInfo(**flags, parent=meta.get("parent"), created=provenance.get("created"),
                     classes=meta["classes"], palette=meta["palette"], input_size=meta["input_size"],
                     architecture=meta["architecture"], sha256=meta.get("sha256"),
                     has_onnx=registry.has_onnx(version), provenance=provenance, domain=info,
                     retired=version in view.retired, routed=version in view.routed,
                     routable=info is not None and version not in view.retired and version != active)


@dataclass(frozen=True)
class RouteView:
    """What ``_info`` needs to know about routing: the retired set and this process's route table."""

    retired: frozenset[str] = frozenset()
    routed: frozenset[str] = frozenset()
    base_signature: Any = None


def _route_view(routes: DomainRoutes, registry: Registry) -> RouteView:
    table = routes.table
    try:
        retired = frozenset(registry.retired())
    except (RegistryError, OSError):  # StoreError is an OSError
        retired = frozenset(routes.retired)  # as of the last poll
    return RouteView(retired, frozenset(r.version for r in table.routes), table.base_signature)


def _active(registry: Registry) -> str | None:
    try:
        return registry.active()
    except (InvalidVersion, StoreError):  # a garbled pointer or a store that is down: unknown right now
        return None


def _serving(manager: EngineManager, registry: Registry) -> ServingModel:
    engine = manager.peek()
    if engine is None:
        raise ApiError(503, "not_ready", "no model version is loaded yet", {"Retry-After": "1"})
    last = manager.last
    return ServingModel(
        version=engine.version, backend=engine.backend, provider=engine.provider,
        loaded_at=datetime.fromtimestamp(manager.loaded_at, UTC) if manager.loaded_at else None,
        swaps=manager.swaps, swap_failures=manager.swap_failures,
        last_swap=LastSwap(version=last.version, previous=last.previous, ok=last.ok, seconds=round(last.seconds, 3),
                           at=datetime.fromtimestamp(last.at, UTC),
                           error=None if last.error is None else redact(last.error)) if last else None,
        model=_info(registry, engine.version, _active(registry), engine.version),
    )


def _lookup(registry: Registry, version: str) -> None:
    try:
        registry.check(version)
    except InvalidVersion as e:
        raise ApiError(422, "invalid_version", str(e)) from e
    except VersionNotFound as e:
        raise ApiError(404, "version_not_found", str(e)) from e


@router.get("", summary="List model versions")
def list_models(registry: RegistryDep, manager: EngineManagerDep, routes: RoutesDep) -> ModelList:
    """All versions in the registry, oldest first, with the active and the serving one marked, and each
    version's domain and routing state (``domain``, ``retired``, ``routable``, ``routed``)."""
    active, serving, view = _active(registry), manager.version, _route_view(routes, registry)
    return ModelList(active=active, serving=serving,
                     versions=[_info(registry, v, active, serving, view) for v in registry.versions()])


@router.get("/active", summary="The version this process serves",
            responses={503: {"description": "no model loaded yet"}})
def active_model(registry: RegistryDep, manager: EngineManagerDep, drift: DriftDep, adaptation: AdaptationDep,
                 routes: RoutesDep) -> ServingModel:
    """The serving version, its backend, when it was loaded and the swap counters of this process, the
    drift signal (``drift``: mean prediction entropy and class distribution, per stream and for the process,
    against the first frames this process served with the version), the worker's auto policy (``auto``) and
    the per-domain routing state (``routing``, service/routing.py)."""
    serving = _serving(manager, registry)
    serving.drift = drift.snapshot()
    serving.auto = _redacted(auto_state(adaptation.jobs))
    serving.routing = routes.snapshot()
    return serving


@router.get("/{version}", summary="Describe one version",
            responses={404: {"description": "unknown version"}, 422: {"description": "invalid version name"}})
def get_model(version: VERSION, registry: RegistryDep, manager: EngineManagerDep, routes: RoutesDep) -> ModelInfo:
    _lookup(registry, version)
    return _info(registry, version, _active(registry), manager.version, _route_view(routes, registry))


RETIRE_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS, 404: {"description": "unknown version"}, 422: {"description": "invalid version name"},
    503: {"description": "the registry is read-only or the model store is unreachable; nothing changed"},
    507: {"description": "the registry's disk is full; nothing changed"}}


def _set_retired(routes: DomainRoutes, registry: Registry, manager: EngineManager, version: str,
                 retired: bool) -> ModelInfo:
    _lookup(registry, version)
    with disk_errors(f"{'retiring' if retired else 'unretiring'} {version}"):
        registry.set_retired(version, retired)
    routes.sync(manager.peek(), force=True)  # this process follows at once, the others within route_poll_s
    return _info(registry, version, _active(registry), manager.version, _route_view(routes, registry))


@router.post("/{version}/retire", summary="Stop routing to a domain version", dependencies=[RequireApiKey],
             responses=RETIRE_ERRORS)
def retire_model(version: VERSION, registry: RegistryDep, manager: EngineManagerDep, routes: RoutesDep) -> ModelInfo:
    """Record in the registry that no stream or upload is routed to ``version`` any more (this process drops
    it at once, the others within ``route_poll_s``). The version stays published: it can still be activated
    or unretired."""
    return _set_retired(routes, registry, manager, version, True)


@router.post("/{version}/unretire", summary="Route to a retired domain version again", dependencies=[RequireApiKey],
             responses=RETIRE_ERRORS)
def unretire_model(version: VERSION, registry: RegistryDep, manager: EngineManagerDep,
                   routes: RoutesDep) -> ModelInfo:
    """Undo ``retire``: the version is routable again if it has a domain."""
    return _set_retired(routes, registry, manager, version, False)


@router.post("/{version}/activate", summary="Activate a version (deploy or roll back)",
             dependencies=[RequireApiKey],
             responses={**AUTH_ERRORS, 404: {"description": "unknown version"},
                        422: {"description": "invalid version name"},
                        409: {"description": "the version failed to load, or another activation won; "
                                              "nothing changed"},
                        503: {"description": "the registry is read-only or the model store is unreachable; "
                                             "nothing changed"},
                        507: {"description": "the registry's disk is full; nothing changed"}})
def activate_model(version: VERSION, registry: RegistryDep, manager: EngineManagerDep) -> ServingModel:
    """Load and warm up ``version``, then point ``ACTIVE`` at it and swap it in without dropping requests.

    Other processes sharing the model directory follow within one registry poll interval. If the
    version cannot be loaded, the pointer and the serving model stay as they were (409).
    """
    _lookup(registry, version)
    try:
        with disk_errors(f"activating {version}"):
            manager.activate(version)
    except EngineLoadError as e:
        raise ApiError(409, "load_failed", str(e)) from e
    except ActivationConflict as e:
        raise ApiError(409, "activation_conflict", str(e)) from e
    return _serving(manager, registry)
