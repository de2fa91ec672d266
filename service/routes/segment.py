"""Segment uploaded videos: ``POST /v1/segment`` (also ``/segment``) and its jobs ``/v1/jobs/{id}``.

A request streams its upload to disk (413 past ``max_upload_bytes``), probes it in an isolated
child process (415 when it cannot be decoded), checks resolution, duration and frame count (422),
then either answers synchronously with the result file (up to ``job_frame_threshold`` frames) or
returns ``202`` with a job to poll. Inference runs on worker threads; every network call takes the
app's FIFO engine lock, so concurrent requests, jobs and streams interleave frame by frame.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from models.config import parse_hxw
from models.flow import FlowProvider, build_flow

from .. import sandboxed_decode
from ..budget import BudgetExceeded, budget
from ..collect import ClipSampler, provenance
from ..deps import AdaptationDep, ApiError, DataPlaneDep, EngineDep, MetricsDep, RoutesDep, SettingsDep
from ..segment_jobs import Job, JobStore, JobStoreFull, LockedEngine
from ..metrics import Metrics
from ..video_segmenter import segment_frames
from ..stream_segmenter import FrameResult
from ..routing import DomainRoutes, route_clip
from ..settings import Settings
from ..uploads import FIELD, MEDIA_TYPES, Upload, receive_upload
from ..video_io import VideoError, VideoInfo
from .errors import disk_errors

Format = Literal["zip", "mp4", "json"]
MIN_SIDE, MAX_SIDE = 64, 2048  # bounds of the inference size override
router = APIRouter(tags=["segment"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary", "description": "the video file"}}}}}}}
ERRORS = {
    202: {"description": "long video: a job was queued; poll the `Location` URL"},
    400: {"description": "malformed multipart body"},
    413: {"description": "upload larger than `max_upload_bytes`"},
    415: {"description": "not multipart, empty, or not a decodable video"},
    422: {"description": "bad parameter, missing `video` field, or a resolution, duration or frame-count "
                         "limit exceeded"},
    503: {"description": "no model loaded yet, too many jobs pending, or the server's storage is read-only"},
    507: {"description": "the server's disk is full (nothing of the request was kept)"},
}


def parse_size(text: str | None, settings: Settings) -> tuple[int, int] | None:
    """``"256x512"`` -> (256, 512): the inference size override (multiples of 8, 64..2048, at most
    ``max_inference_pixels``)."""
    if text is None:
        return None
    try:
        h, w = parse_hxw(text, min_side=0)  # the range is checked below, with its own message
    except ValueError:
        raise ApiError(422, "invalid_request", f"size must be HEIGHTxWIDTH, e.g. 256x512; got {text!r}") from None
    if h % 8 or w % 8 or not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise ApiError(422, "invalid_request", f"size {h}x{w}: both sides must be multiples of 8 between "
                                               f"{MIN_SIDE} and {MAX_SIDE}")
    try:
        budget(settings).check_inference(h, w)
    except BudgetExceeded as e:
        raise ApiError(422, e.code, e.message) from e
    return h, w


def check_limits(info: VideoInfo, settings: Settings, stride: int, max_frames: int | None) -> int:
    """Enforce resolution, duration and frame limits; returns the number of frames to segment (0: unknown).

    The resolution limit applies to the long and the short side, so portrait videos are treated
    like landscape ones; the label maps and overlay frames made at the video's resolution must fit the
    pixel budget.
    """
    long_limit, short_limit = max(settings.max_width, settings.max_height), min(settings.max_width,
                                                                                settings.max_height)
    if max(info.width, info.height) > long_limit or min(info.width, info.height) > short_limit:
        raise ApiError(422, "resolution_too_large", f"the video is {info.width}x{info.height}; the limit is "
                                                    f"{settings.max_width}x{settings.max_height}")
    try:
        budget(settings).check_pixels(info.height, info.width, "the video's frames (and label maps)")
    except BudgetExceeded as e:
        raise ApiError(422, "resolution_too_large", e.message) from e
    if info.duration_s > settings.max_duration_s:
        raise ApiError(422, "video_too_long", f"the video lasts {info.duration_s:.1f} s; the limit is "
                                              f"{settings.max_duration_s:g} s")
    frames = info.frames or int(round(info.duration_s * info.fps))
    total = math.ceil(frames / stride) if frames else 0
    if max_frames is not None:
        total = min(total, max_frames) if total else max_frames
    if total > settings.max_frames:
        raise ApiError(422, "too_many_frames", f"the video has {frames} frames ({total} at stride {stride}); the "
                                               f"limit is {settings.max_frames}: pass max_frames or a larger stride")
    return total


def decode_limits(settings: Settings) -> sandboxed_decode.DecodeLimits:
    """The isolated decoder's limits: ``decode_timeout_s``, ``decode_memory_mb`` and the pixel budget."""
    return sandboxed_decode.DecodeLimits(timeout_s=settings.decode_timeout_s, memory_mb=settings.decode_memory_mb,
                               max_pixels=budget(settings).max_pixels)


def _frame_hook(metrics: Metrics, sampler: ClipSampler | None) -> Callable[[np.ndarray, FrameResult], None]:
    frames = metrics.frames_segmented.labels(source="upload")
    seconds = metrics.inference_seconds.labels(stage="upload_frame")

    def on_frame(frame: np.ndarray, result: FrameResult) -> None:
        frames.inc()
        seconds.observe(result.latency_ms / 1000.0)
        if sampler is not None:
            sampler.push(frame)

    return on_frame


@router.post("/v1/segment", summary="Segment an uploaded video", openapi_extra=UPLOAD_BODY, responses={
    200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "the result file"}, **ERRORS})
@router.post("/segment", include_in_schema=False, openapi_extra=UPLOAD_BODY)
async def segment(
    request: Request, settings: SettingsDep, metrics: MetricsDep, engine: EngineDep, plane: DataPlaneDep,
    adaptation: AdaptationDep, routes: RoutesDep,
    fmt: Annotated[Format, Query(alias="format", description="zip: palette PNG label maps + manifest.json; "
                                 "mp4: overlay video with a legend; json: per-frame class statistics")] = "zip",
    size: Annotated[str | None, Query(description="inference size override HEIGHTxWIDTH, e.g. 256x512: multiples of 8 "
                                      f"in {MIN_SIDE}..{MAX_SIDE}, at most `max_inference_pixels` pixels",
                                      json_schema_extra={"pattern": "^[0-9]{1,5}x[0-9]{1,5}$"})] = None,
    stride: Annotated[int, Query(ge=1, le=1000, description="segment every stride-th frame")] = 1,
    max_frames: Annotated[int | None, Query(ge=1, description="segment at most this many frames")] = None,
    collect: Annotated[bool, Query(description="let sampled frames feed the adaptation clip buffer")] = True,
) -> Response:
    """Upload a video as the multipart field `video`. Videos with at most `job_frame_threshold` frames to
    segment are answered with the file itself (`Content-Disposition: attachment`); longer ones get
    `202 Accepted`, a job body and a `Location: /v1/jobs/{id}` header."""
    input_size = parse_size(size, settings)
    prov = provenance(request, settings, "/v1/segment")
    if max_frames is not None and max_frames > settings.max_frames:
        raise ApiError(422, "invalid_request", f"max_frames={max_frames} is over the limit of {settings.max_frames}")
    with disk_errors("storing the upload"):
        workdir = await run_in_threadpool(plane.jobs.workdir)
    owned = False  # True once a response or a job is responsible for deleting workdir
    video: sandboxed_decode.VideoStream | None = None
    try:
        with disk_errors("storing the upload"):
            upload = await receive_upload(request, workdir / "upload.bin", settings.max_upload_bytes)
        cap = min(max_frames or settings.max_frames, settings.max_frames)
        # One isolated child probes the file and then decodes ahead while the limits are checked.
        video = sandboxed_decode.VideoStream(upload.path, max_frames=cap, stride=stride, limits=decode_limits(settings))
        try:
            info = await run_in_threadpool(video.probe)
        except VideoError as e:
            raise ApiError(415, "unsupported_media_type", _media_message(e, upload)) from e
        total = check_limits(info, settings, stride, max_frames)
        sampler = adaptation.sampler("upload", prov, hold=True) if collect else None
        work = Segmentation(
            engine=LockedEngine(engine, plane.engine_lock, plane.batcher), info=info, upload=upload, fmt=fmt,
            stride=stride, cap=cap, input_size=input_size, limits=video.limits, out=workdir / f"result.{fmt}",
            flow=build_flow(settings.flow, str(settings.raft_weights) if settings.raft_weights else None),
            on_frame=_frame_hook(metrics, sampler), sampler=sampler, routes=routes)
        if total == 0 or total > settings.job_frame_threshold:
            video.close()  # a queued job must not hold a decoder process: it starts its own
            with disk_errors("queuing the job"):
                job = _submit(plane.jobs, workdir, total or cap, work)
            owned = True
            return JSONResponse(job.public(), 202, headers={"Location": f"/v1/jobs/{job.id}"})
        try:
            with disk_errors("writing the result"):
                summary = await run_in_threadpool(work.run, video)
        except VideoError as e:
            raise ApiError(415, "unsupported_media_type", _media_message(e, upload)) from e
        owned = True
        return FileResponse(work.out, media_type=MEDIA_TYPES[fmt], filename=work.filename,
                            headers={"X-Model-Version": summary["model_version"], "X-Frames": str(summary["frames"])},
                            background=BackgroundTask(shutil.rmtree, workdir, ignore_errors=True))
    finally:
        if video is not None:
            video.close()
        if not owned:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Segmentation:
    """One upload's segmentation, fully decided before its first frame is segmented."""

    engine: LockedEngine
    flow: FlowProvider
    info: VideoInfo
    upload: Upload
    out: Path
    fmt: str
    stride: int
    cap: int
    input_size: tuple[int, int] | None
    limits: sandboxed_decode.DecodeLimits
    on_frame: Callable[[np.ndarray, FrameResult], None]
    sampler: ClipSampler | None = None  # its clips feed the buffer only once the whole input decoded
    routes: DomainRoutes | None = None  # per-domain versions: the first frames pick the version (service/routing.py)

    @property
    def filename(self) -> str:
        """The download name: the client's file name (sanitised) + ``-segmentation.<fmt>``."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.upload.filename).stem)[:64].strip("._") or "video"
        return f"{stem}-segmentation.{self.fmt}"

    def run(self, frames: sandboxed_decode.VideoStream | None = None,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Segment (blocking; a worker thread); the upload is deleted afterwards, whatever happens."""
        if frames is None:
            frames = sandboxed_decode.VideoStream(self.upload.path, max_frames=self.cap, stride=self.stride,
                                                  limits=self.limits)
        try:
            raw, routed = route_clip(self.routes, self.engine.inner, frames)
            engine = self.engine if raw is self.engine.inner else LockedEngine(raw, self.engine.lock,
                                                                               self.engine.batcher)
            summary = segment_frames(engine, self.flow, routed, self.info, self.out, self.fmt,
                                     stride=self.stride, input_size=self.input_size, progress=progress,
                                     on_frame=self.on_frame)
            if self.sampler is not None:
                self.sampler.commit()  # only now: a decoding error ends segment_frames with VideoError
            return summary
        finally:
            frames.close()
            self.upload.path.unlink(missing_ok=True)


def _media_message(error: Exception, upload: Upload) -> str:
    """The decoder's message with the client's file name instead of the server-side one."""
    return str(error).replace(upload.path.name, upload.filename or "upload")


def _submit(jobs: JobStore, workdir: Path, total: int, work: Segmentation) -> Job:
    def run(job: Job) -> None:
        moved = replace(work, upload=replace(work.upload, path=job.workdir / work.upload.path.name),
                        out=job.workdir / work.out.name)  # submit moved workdir to the job's own directory
        try:
            summary = moved.run(progress=lambda done: jobs.progress(job, done))
        except VideoError as e:
            jobs.fail(job, "unsupported_media_type", _media_message(e, moved.upload))
            return
        jobs.finish(job, moved.out, MEDIA_TYPES[work.fmt], work.filename, summary)

    try:
        return jobs.submit(workdir, total, work.fmt, run)
    except JobStoreFull as e:
        raise ApiError(503, "too_many_jobs", str(e), {"Retry-After": "10"}) from e


def _job(plane: DataPlaneDep, job_id: str) -> Job:
    job = plane.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (unknown, or removed after its TTL)")
    return job


@router.get("/v1/jobs/{job_id}", summary="State, progress and ETA of a segmentation job",
            responses={404: {"description": "unknown or expired job"}})
async def job_status(plane: DataPlaneDep, job_id: str) -> dict[str, Any]:
    """`state` is queued, running, done or failed; `progress` is in [0, 1]; `eta_s` is an estimate."""
    return _job(plane, job_id).public()


@router.get("/v1/jobs/{job_id}/result", summary="Download the result of a finished job",
            response_class=FileResponse,
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, 404: {"description": "unknown job"},
                       409: {"description": "the job is not done (queued, running or failed)"}})
async def job_result(plane: DataPlaneDep, job_id: str) -> FileResponse:
    """The result file once `state` is done; 409 before (or with the job's error if it failed)."""
    job = _job(plane, job_id)
    if job.state == "failed":
        assert job.error is not None
        raise ApiError(409, "job_failed", f"job {job_id} failed: {job.error['message']}")
    if job.state != "done" or job.result is None:
        raise ApiError(409, "job_not_done", f"job {job_id} is {job.state} ({job.done}/{job.total} frames)",
                       {"Retry-After": "1"})
    summary = job.summary or {}
    return FileResponse(job.result, media_type=job.media_type, filename=job.filename,
                        headers={"X-Model-Version": str(summary.get("model_version", "")),
                                 "X-Frames": str(summary.get("frames", ""))})
