"""Online adaptation: ``POST /v1/adapt`` (also ``/adapt``), ``GET /v1/adapt[/{id}]``, ``POST /v1/adapt/{id}/cancel``.

A job adapts the ACTIVE model to the clips in the buffer in the adaptation worker (another
process), gates the candidate, and publishes + activates it only if the gate passes; every server
sharing the model directory then hot-swaps it in. One job runs at a time. The app's
``AdaptationPlane`` (``service.components``: the buffer, the job store, the worker supervisor) comes
through ``service.deps.AdaptationDep``. Jobs the worker's auto policy queues (``service.auto_rounds``)
carry ``trigger: auto``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from ..adapt_jobs import ACTIVE_STATES, JobConflict, JobNotFound
from ..budget import BudgetExceeded, budget
from ..components import AdaptationPlane
from ..deps import AUTH_ERRORS, AdaptationDep, ApiError, RequireApiKey
from ..settings import Settings
from .errors import disk_errors

PRIVATE_JOB_FIELDS = ("worker",)  # the job file's record of which process (pid, host) runs it
JOB_ID = Path(description="job id (32 hex digits)", pattern=r"^[0-9a-f]{32}$")


router = APIRouter(tags=["adapt"])


class AdaptRequest(BaseModel):
    """What to run; everything but ``method`` has a default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN / Infinity: 422

    method: str = Field("tent", description="source-free method: bn, tent, itcr, stpl, selftrain, srcstats "
                        "(needs source statistics stored with the model) or cotta")
    steps: int = Field(100, ge=1, description="optimisation steps (at most `adapt_max_steps`)")
    lr: float | None = Field(None, ge=0, description="learning rate (default: the method's)")
    time_budget_s: float | None = Field(None, gt=0, description="stop training after this many seconds")
    batch_size: int | None = Field(None, ge=1, le=32,
                                   description="(t-1, t) frame pairs per step (default: the method's)")
    seed: int = Field(0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict, description="method keyword arguments")
    authenticated_only: bool = Field(False, description="train and gate only on clips that authenticated "
                                     "clients (the API key) added; see VSS_COLLECT")
    labeled_frames: int = Field(0, ge=0, le=4, description="also train on this many labeled frames of the "
                                "VSS_VAL_DIR clips (the gate scores on the same clips); needs VSS_VAL_DIR")

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
    if body.labeled_frames and settings.val_dir is None:
        raise ApiError(422, "no_labeled_clips", "labeled_frames needs labeled clips: set VSS_VAL_DIR")
    if body.labeled_frames and body.method == "bn":
        raise ApiError(422, "invalid_request", "labeled_frames needs a method that trains weights (not bn)")
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
async def start_job(plane: AdaptationDep, body: AdaptRequest) -> JSONResponse:
    """Adapt the ACTIVE model to the clip buffer with `method` for `steps` steps (or `time_budget_s`).

    The candidate is published and activated only if it passes the gate (held-out buffered clips,
    plus labeled validation clips when the server has `VSS_VAL_DIR`); the job ends `published`
    with the new `version`, `rejected` with the gate's reasons, `failed` or `cancelled`."""
    _validate_method(body, plane.settings)
    with disk_errors("creating the adaptation job"):
        job = await run_in_threadpool(_create, plane, body)
    return JSONResponse(JobState(**job).model_dump(mode="json"), 202, headers={"Location": f"/v1/adapt/{job['id']}"})


@router.get("/v1/adapt", summary="List adaptation jobs, newest first")
async def list_jobs(plane: AdaptationDep) -> JobList:
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
async def get_job(plane: AdaptationDep, job_id: Annotated[str, JOB_ID]) -> JobState:
    return JobState(**await _get(plane, job_id))


@router.post("/v1/adapt/{job_id}/cancel", summary="Cancel a job", dependencies=[RequireApiKey],
             responses={**AUTH_ERRORS, 404: {"description": "unknown job"},
                        409: {"description": "the job already ended"}})
async def cancel_job(plane: AdaptationDep, job_id: Annotated[str, JOB_ID]) -> JobState:
    """A queued job is cancelled at once; a running one stops at its next step and ends `cancelled`
    (nothing is published)."""
    job = await _get(plane, job_id)
    if job["state"] not in ACTIVE_STATES:
        raise ApiError(409, "job_finished", f"job {job_id} already ended ({job['state']})")
    return JobState(**await run_in_threadpool(plane.jobs.request_cancel, job_id))
