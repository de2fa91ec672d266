"""Online adaptation: ``POST /v1/adapt`` (also ``/adapt``), ``GET /v1/adapt[/{id}]``, ``POST /v1/adapt/{id}/cancel``.

A job adapts the ACTIVE model to the clips in the buffer in the adaptation worker (another
process), gates the candidate, and publishes + activates it only if the gate passes; every server
sharing the model directory then hot-swaps it in. One job runs at a time. ``AdaptationPlane`` holds
what these routes, the clip routes and the collect hook share: the buffer, its background writer,
the job store and, with ``VSS_WORKER=spawn``, the supervisor of the worker child process (started
with the first job, or at startup when the auto policy is on or a job is waiting).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from ..adapt_jobs import ACTIVE_STATES, AdaptJobStore, JobConflict, JobNotFound
from ..buffer import ClipBuffer, ClipCollector
from ..budget import BudgetExceeded, budget
from ..collect import Provenance, RateLimiter
from ..deps import AUTH_ERRORS, ApiError, RequireApiKey
from ..settings import Settings
from ..storage import StoreError
from ..supervisor import WorkerSupervisor, worker_command
from ..worker import clip_buffer, job_store, worker_settings_json
from .errors import disk_errors

log = logging.getLogger(__name__)
PRIVATE_JOB_FIELDS = ("worker",)  # the job file's record of which process (pid, host) runs it
JOB_ID = Path(description="job id (32 hex digits)", pattern=r"^[0-9a-f]{32}$")


@dataclass
class AdaptationPlane:
    """The clip buffer, its writer thread, the job store and the worker supervisor of one app."""

    settings: Settings
    buffer: ClipBuffer
    collector: ClipCollector
    jobs: AdaptJobStore
    supervisor: WorkerSupervisor | None
    limiter: RateLimiter
    refused: Callable[[str], None] = lambda reason: None  # counts clips refused, by reason

    def start(self) -> None:
        try:
            self.jobs.ensure()
            self.jobs.sweep()  # temp files of a process that died
            self.buffer.sweep()
        except StoreError as e:  # the object store is down: routes answer 503 until it returns
            log.error("cannot reach the clip buffer or the adaptation jobs in %s: %s", self.jobs.root, e)
        except OSError as e:  # a read-only or full disk: adapt and clip routes answer 503/507 until it is fixed
            log.error("the clip buffer or the adaptation job directory is not usable: %s", e)
        try:
            pending = self.jobs.active() is not None
        except OSError as e:  # the store is down (StoreError) or unreadable: start the worker anyway; it waits
            log.error("cannot read adaptation jobs in %s: %s", self.jobs.root, e)
            pending = True
        if self.settings.adapt_auto_clips > 0 or pending:
            self.ensure_worker()

    def offer(self, frames: list[Any], source: str, prov: Provenance) -> bool:
        """Hand a sampled clip to the collector if the client is within its rate limit (any thread)."""
        if not self.limiter.take(prov.client):
            self.refused("rate_limited")
            return False
        if not self.collector.submit(frames, source, prov.to_dict()):
            self.refused("queue_full")
            return False
        return True

    def ensure_worker(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()

    def worker_status(self) -> dict[str, Any]:
        s = self.settings
        sup = self.supervisor
        return {"mode": s.worker, "restarts": sup.restarts if sup else 0,
                "alive": len(self.jobs.workers(max(3 * s.adapt_heartbeat_s, 5.0)))}

    def close(self) -> None:
        self.collector.close()
        if self.supervisor is not None:
            self.supervisor.stop()


def build_plane(app: Any) -> AdaptationPlane:
    settings: Settings = app.state.settings
    buffer = clip_buffer(settings)
    manager = app.state.engine_manager

    def input_size() -> tuple[int, int] | None:
        engine = manager.peek()
        return None if engine is None else (int(engine.meta["input_size"][0]), int(engine.meta["input_size"][1]))

    metrics = getattr(app.state, "metrics", None)
    on_added = None
    refused: Callable[[str], None] = lambda reason: None  # noqa: E731
    if metrics is not None:
        from prometheus_client import Counter

        counter = Counter("vss_buffer_clips_added_total", "Clips added to the adaptation clip buffer", ["source"],
                          registry=metrics.registry)
        refusals = Counter("vss_buffer_clips_refused_total", "Sampled clips not added to the clip buffer",
                           ["reason"], registry=metrics.registry)
        on_added = lambda info: counter.labels(source=info.source).inc()  # noqa: E731
        refused = lambda reason: refusals.labels(reason=reason).inc()  # noqa: E731
    jobs = job_store(settings)
    supervisor = None
    if settings.worker == "spawn":
        supervisor = WorkerSupervisor(worker_command(worker_settings_json(settings), os.getpid()), jobs,
                                      settings.adapt_heartbeat_timeout_s)
    return AdaptationPlane(settings, buffer, ClipCollector(buffer, input_size, on_added=on_added), jobs, supervisor,
                           RateLimiter(settings.collect_rate_clips, settings.collect_rate_window_s), refused)


def adaptation_plane(app: Any) -> AdaptationPlane:
    """The app's plane (built at startup by this router's lifespan; built here if the app never started)."""
    plane = getattr(app.state, "adaptation", None)
    if plane is None:
        plane = app.state.adaptation = build_plane(app)
    return plane


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    plane = adaptation_plane(app)
    await run_in_threadpool(plane.start)
    try:
        yield
    finally:
        await run_in_threadpool(plane.close)


router = APIRouter(tags=["adapt"], lifespan=_lifespan)


class AdaptRequest(BaseModel):
    """What to run; everything but ``method`` has a default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN / Infinity: 422

    method: str = Field("tent", description="source-free method: bn, tent, itcr, stpl, selftrain or cotta")
    steps: int = Field(100, ge=1, description="optimisation steps (at most `adapt_max_steps`)")
    lr: float | None = Field(None, ge=0, description="learning rate (default: the method's)")
    time_budget_s: float | None = Field(None, gt=0, description="stop training after this many seconds")
    batch_size: int | None = Field(None, ge=1, le=32,
                                   description="(t-1, t) frame pairs per step (default: the method's)")
    seed: int = Field(0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict, description="method keyword arguments")
    authenticated_only: bool = Field(False, description="train and gate only on clips that authenticated "
                                     "clients (the API key) added; see VSS_COLLECT")

    @field_validator("lr", "time_budget_s")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class JobState(BaseModel):
    """An adaptation job (``GET /v1/adapt/{id}``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    state: str = Field(description="queued, running, gating, published, rejected, failed or cancelled")
    trigger: str = Field(description="api, or auto (the worker's auto policy)")
    request: dict[str, Any]
    stage: str | None = Field(description="loading, bn_prepass, train, gate, publishing")
    step: int
    steps: int
    progress: float = Field(description="training progress in [0, 1]")
    losses: list[dict[str, float]] = Field(description="training log every 10 steps (newest last)")
    parent: str | None = Field(description="the version that was adapted")
    version: str | None = Field(description="the published version (state published)")
    activated: bool
    gate: dict[str, Any] | None = Field(description="passed, reasons and metrics of the publish gate")
    clips: dict[str, Any] | None = Field(description="buffered clips used for training and held out")
    error: dict[str, str] | None
    cancel_requested: bool
    created: float
    started: float | None
    finished: float | None

    @model_validator(mode="before")
    @classmethod
    def _public(cls, data: Any) -> Any:
        """The stored job without the worker's identity (pid, host): answers never show them."""
        return {k: v for k, v in data.items() if k not in PRIVATE_JOB_FIELDS} if isinstance(data, dict) else data


class JobList(BaseModel):
    jobs: list[JobState]
    worker: dict[str, Any] = Field(description="worker mode, restarts of the spawned worker, and how many workers "
                                   "sent a heartbeat lately (`alive`)")


def _validate_method(body: AdaptRequest, settings: Settings) -> None:
    """Method, budget (steps, seconds) and options against the method's declared ``OPTIONS``."""
    from adaptation.methods import build_method
    from adaptation.options import OptionError
    from adaptation.sourcefree import SOURCE_FREE

    if body.method not in SOURCE_FREE:
        raise ApiError(422, "unknown_method", f"unknown method {body.method!r}; choose one of {', '.join(SOURCE_FREE)}")
    try:
        budget(settings).check_adapt(body.steps, body.time_budget_s)
    except BudgetExceeded as e:
        raise ApiError(422, e.code, e.message) from e
    try:
        build_method(body.method, seed=body.seed, **body.options)  # checks the options the method declares
    except OptionError as e:
        raise ApiError(422, "invalid_options", f"bad options for {body.method}: {e}", details={"option": e.name}) from e
    except (TypeError, ValueError) as e:
        raise ApiError(422, "invalid_options", f"bad options for {body.method}: {e}") from e


def _create(plane: AdaptationPlane, body: AdaptRequest) -> dict[str, Any]:
    settings = plane.settings
    plane.jobs.reap(settings.adapt_heartbeat_timeout_s)
    usable = [c for c in plane.buffer.clips() if c.authenticated or not body.authenticated_only]
    train = sum(not c.heldout for c in usable)
    if train < settings.adapt_min_clips:
        which = " authenticated" if body.authenticated_only else ""
        raise ApiError(409, "not_enough_clips", f"the clip buffer holds {train}{which} training clip(s); at least "
                                                f"{settings.adapt_min_clips} are needed: stream or segment target "
                                                "videos with collect on, or POST /v1/clips")
    try:
        job = plane.jobs.create(body.model_dump())
    except JobConflict as e:
        raise ApiError(409, "job_running", str(e), {"Location": f"/v1/adapt/{e.job['id']}"},
                       details={"job": e.job["id"], "state": e.job["state"]}) from e
    plane.ensure_worker()
    return job


@router.post("/v1/adapt", summary="Start an adaptation job on the buffered clips", status_code=202,
             dependencies=[RequireApiKey], response_model=JobState,
             responses={202: {"description": "queued; poll the `Location` URL"},
                        **AUTH_ERRORS, 400: {"description": "malformed JSON body"},
                        413: {"description": "a body over 1 MiB"},
                        409: {"description": "a job is already queued or running, or too few buffered clips"},
                        422: {"description": "unknown method, bad options or out-of-range values"},
                        503: {"description": "the job directory is read-only"}, 507: {"description": "disk full"}})
@router.post("/adapt", include_in_schema=False, status_code=202, dependencies=[RequireApiKey])
async def start_job(request: Request, body: AdaptRequest) -> JSONResponse:
    """Adapt the ACTIVE model to the clip buffer with `method` for `steps` steps (or `time_budget_s`).

    The candidate is published and activated only if it passes the gate (held-out buffered clips,
    plus labeled validation clips when the server has `VSS_VAL_DIR`); the job ends `published`
    with the new `version`, `rejected` with the gate's reasons, `failed` or `cancelled`."""
    plane = adaptation_plane(request.app)
    _validate_method(body, plane.settings)
    with disk_errors("creating the adaptation job"):
        job = await run_in_threadpool(_create, plane, body)
    return JSONResponse(JobState(**job).model_dump(mode="json"), 202, headers={"Location": f"/v1/adapt/{job['id']}"})


@router.get("/v1/adapt", summary="List adaptation jobs, newest first")
async def list_jobs(request: Request) -> JobList:
    plane = adaptation_plane(request.app)

    def read() -> JobList:
        plane.jobs.reap(plane.settings.adapt_heartbeat_timeout_s)
        return JobList(jobs=plane.jobs.list(), worker=plane.worker_status())

    return await run_in_threadpool(read)


async def _get(plane: AdaptationPlane, job_id: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        plane.jobs.reap(plane.settings.adapt_heartbeat_timeout_s)
        return plane.jobs.get(job_id)

    try:
        return await run_in_threadpool(read)
    except JobNotFound as e:
        raise ApiError(404, "job_not_found", f"no adaptation job {job_id!r}") from e


@router.get("/v1/adapt/{job_id}", summary="State, progress, losses, gate report and version of a job",
            responses={404: {"description": "unknown job"}})
async def get_job(request: Request, job_id: Annotated[str, JOB_ID]) -> JobState:
    return JobState(**await _get(adaptation_plane(request.app), job_id))


@router.post("/v1/adapt/{job_id}/cancel", summary="Cancel a job", dependencies=[RequireApiKey],
             responses={**AUTH_ERRORS, 404: {"description": "unknown job"},
                        409: {"description": "the job already ended"}})
async def cancel_job(request: Request, job_id: Annotated[str, JOB_ID]) -> JobState:
    """A queued job is cancelled at once; a running one stops at its next step and ends `cancelled`
    (nothing is published)."""
    plane = adaptation_plane(request.app)
    job = await _get(plane, job_id)
    if job["state"] not in ACTIVE_STATES:
        raise ApiError(409, "job_finished", f"job {job_id} already ended ({job['state']})")
    return JobState(**await run_in_threadpool(plane.jobs.request_cancel, job_id))
