"""The clip buffer over HTTP: ``GET /v1/clips`` (counts), ``POST /v1/clips`` (add target clips), ``DELETE /v1/clips``.

Streams and uploads feed the buffer on their own (one run of ``buffer_clip_frames`` consecutive
frames every ``buffer_clip_every`` frames, unless the client sends ``collect=false``). This route
adds target clips explicitly: a multipart body with one ``video`` file, or with ``images`` files
(consecutive frames, in order). Frames are stored at the served model's input size.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParser
from starlette.concurrency import run_in_threadpool

from .. import sandboxed_decode
from ..budget import budget
from ..buffer import ClipBuffer, ClipInfo
from ..collect import Provenance, allows, collect_mode, provenance
from ..deps import AUTH_ERRORS, AdaptationDep, ApiError, DataPlaneDep, EngineDep, RequireApiKey, SettingsDep
from ..settings import Settings
from ..stream_codec import StreamConfig, StreamError, jpeg_size, precheck_frame
from ..uploads import PartHeaders, feed_parser, multipart_boundary
from ..video_io import VideoError
from .errors import disk_errors
from .segment import check_limits, decode_limits

router = APIRouter(tags=["adapt"])

VIDEO_FIELD, IMAGE_FIELDS = "video", ("images", "image")
MAX_IMAGES = 512
CLIPS_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {
        VIDEO_FIELD: {"type": "string", "format": "binary", "description": "a target-domain video"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "or consecutive frames (JPEG/PNG), in order"}}}}}}}


@dataclass
class Part:
    name: str
    path: Path
    size: int = 0


async def receive_parts(request: Request, workdir: Path, max_bytes: int) -> list[Part]:
    """Stream every file part of a multipart body to its own file under ``workdir`` (413 past ``max_bytes``)."""
    boundary = multipart_boundary(request, max_bytes, "a 'video' file or 'images' files")
    parts: list[Part] = []
    current: dict[str, Any] = {"file": None}
    headers = PartHeaders()

    def on_headers_finished() -> None:
        name, _ = headers.name_and_filename()
        if name == VIDEO_FIELD or name in IMAGE_FIELDS:
            if len(parts) >= MAX_IMAGES:
                raise ApiError(422, "too_many_parts", f"at most {MAX_IMAGES} images per request")
            parts.append(Part(name, workdir / f"part-{len(parts):04d}"))
            current["file"] = open(parts[-1].path, "wb")  # noqa: SIM115 - closed in on_part_end

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if current["file"] is not None:
            current["file"].write(data[start:end])
            parts[-1].size += end - start

    def on_part_end() -> None:
        if current["file"] is not None:
            current["file"].close()
            current["file"] = None

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": headers.begin, **headers.callbacks(), "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        await feed_parser(request, parser, max_bytes)
    finally:
        on_part_end()
    return parts


def _image_frames(parts: list[Part], settings: Settings, size: tuple[int, int]) -> list[np.ndarray]:
    """Decode the images one at a time, each resized to ``size`` at once (only one full-size image is ever
    held). The header is checked against the budget first; a JPEG is decoded at a reduced scale when it
    is at least twice the size needed."""
    from ..buffer import resize_frames

    config, limits = StreamConfig(), budget(settings)
    frames = []
    for i, part in enumerate(parts):
        if part.size > limits.max_message_bytes:
            raise ApiError(413, "payload_too_large", f"image {i} is {part.size} bytes; one image may have at most "
                                                     f"{limits.max_message_bytes} bytes (VSS_WS_MAX_MESSAGE_BYTES)")
        data = part.path.read_bytes()
        try:
            kind = precheck_frame(data, config, limits.max_pixels)
        except StreamError as e:
            status = 422 if e.code == "frame_too_large" else 415
            raise ApiError(status, e.code, f"image {i}: {e.message}") from e
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _decode_flag(kind, data, size))
        if bgr is None:
            raise ApiError(415, "undecodable_image", f"image {i} is not a decodable JPEG or PNG")
        frames.append(resize_frames([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)], size)[0])
    return frames


def _decode_flag(kind: str, data: bytes, size: tuple[int, int]) -> int:
    """``cv2.imdecode`` flag: JPEGs decode at 1/2, 1/4 or 1/8 scale while that still covers ``size``."""
    header = jpeg_size(data) if kind == "jpeg" else None
    if header is not None:
        for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                             (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if header[0] // factor >= size[0] and header[1] // factor >= size[1]:
                return flag
    return cv2.IMREAD_COLOR


def _video_frames(part: Part, settings: Settings, max_frames: int, stride: int,
                  size: tuple[int, int]) -> list[np.ndarray]:
    """Decode (in the isolated decoder child) and resize to the model input size as frames arrive."""
    from ..buffer import resize_frames

    limits = decode_limits(settings)
    with sandboxed_decode.VideoStream(part.path, max_frames=max_frames, stride=stride, limits=limits) as video:
        try:
            info = video.probe()
            check_limits(info, settings, stride, max_frames)
            return [resize_frames([frame], size)[0] for frame in video]
        except VideoError as e:
            raise ApiError(415, "unsupported_media_type", str(e).replace(part.path.name, "the video")) from e


@router.get("/v1/clips", summary="What the adaptation clip buffer holds")
async def buffer_stats(plane: AdaptationDep, settings: SettingsDep) -> dict[str, Any]:
    """Counts (training and held-out clips), bytes, limits, the oldest and newest clip, and how traffic is
    sampled into the buffer."""
    stats = await run_in_threadpool(plane.buffer.stats)
    mode = collect_mode(settings)
    return {**stats, "collect": mode != "off", "collect_mode": mode, "clip_frames": settings.buffer_clip_frames,
            "clip_every": settings.buffer_clip_every, "rate_limit": {"clips": settings.collect_rate_clips,
                                                                      "window_s": settings.collect_rate_window_s}}


@router.post("/v1/clips", summary="Add target clips to the buffer", status_code=201, dependencies=[RequireApiKey],
             openapi_extra=CLIPS_BODY, responses={
                 **AUTH_ERRORS, 400: {"description": "malformed multipart body"},
                 403: {"description": "wrong API key, or the collect policy (VSS_COLLECT) refuses this client"},
                 413: {"description": "body over `max_upload_bytes`, or one image over `ws_max_message_bytes`"},
                 415: {"description": "not multipart, or undecodable video/images"},
                 429: {"description": "the client's clip rate limit is reached"},
                 503: {"description": "no model loaded yet, or the buffer's storage is read-only or unreachable"},
                 507: {"description": "the disk is full"},
                 422: {"description": "no usable part, fewer than 2 frames, or a limit exceeded"}})
async def add_clips(
    request: Request, settings: SettingsDep, engine: EngineDep, plane: AdaptationDep, data: DataPlaneDep,
    clip_frames: Annotated[int | None, Query(ge=2, le=64, description="frames per clip "
                                             "(default: buffer_clip_frames)")] = None,
    stride: Annotated[int, Query(ge=1, le=100, description="keep every stride-th video frame")] = 1,
    max_frames: Annotated[int, Query(ge=2, le=2048, description="decode at most this many video frames")] = 256,
) -> JSONResponse:
    """Send one `video` file, or `images` files (consecutive frames in order). They are cut into clips of
    `clip_frames` consecutive frames (a shorter remainder of at least 2 frames is kept) and stored at the
    model's input size; some clips are held out for the publish gate."""
    prov = provenance(request, settings, "/v1/clips")
    mode = collect_mode(settings)
    if not allows(mode, prov.authenticated):
        why = "collection is off on this server" if mode == "off" else "only authenticated clients may add clips"
        raise ApiError(403, "collect_refused", f"{why} (VSS_COLLECT={mode})")
    size = (int(engine.meta["input_size"][0]), int(engine.meta["input_size"][1]))
    per_clip = clip_frames or settings.buffer_clip_frames
    with disk_errors("storing the clips"):
        workdir = await run_in_threadpool(data.jobs.workdir)
    try:
        with disk_errors("storing the clips"):
            parts = await receive_parts(request, workdir, settings.max_upload_bytes)
        videos = [p for p in parts if p.name == VIDEO_FIELD]
        images = [p for p in parts if p.name != VIDEO_FIELD]
        if len(videos) > 1 or (videos and images):
            raise ApiError(422, "invalid_request", "send one 'video' file or 'images' files, not both")
        if not parts or any(p.size == 0 for p in parts):
            raise ApiError(422, "missing_frames", "the body needs a non-empty 'video' file or 'images' files")
        if videos:
            frames = await run_in_threadpool(_video_frames, videos[0], settings, min(max_frames, settings.max_frames),
                                             stride, size)
        else:
            frames = await run_in_threadpool(_image_frames, images, settings, size)
        if len(frames) < 2:
            raise ApiError(422, "too_few_frames", f"a clip needs at least 2 consecutive frames, got {len(frames)}")

        pieces = [p for p in (frames[i:i + per_clip] for i in range(0, len(frames), per_clip)) if len(p) >= 2]
        if not plane.limiter.take(prov.client, len(pieces)):
            raise ApiError(429, "rate_limited", f"{len(pieces)} more clip(s) would pass this client's limit of "
                                                f"{settings.collect_rate_clips} clips per "
                                                f"{settings.collect_rate_window_s:g} s",
                           {"Retry-After": str(plane.limiter.retry_after(prov.client) or 1)})
        with disk_errors("storing the clips"):
            added, duplicates = await run_in_threadpool(store_clips, plane.buffer, pieces, size, prov)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stats = await run_in_threadpool(plane.buffer.stats)
    return JSONResponse({"added": added, "duplicates": duplicates, "frames": len(frames), "buffer": stats}, 201)


def store_clips(buffer: ClipBuffer, pieces: list[list[np.ndarray]], size: tuple[int, int],
                prov: Provenance) -> tuple[list[dict[str, Any]], int]:
    """Add every piece (duplicates of buffered clips are counted, not stored); all or nothing: when one
    fails (a full disk) the clips this request already added are removed again."""
    added: list[ClipInfo] = []
    duplicates = 0
    try:
        for piece in pieces:
            info, new = buffer.add_new(piece, "api", size, prov.to_dict())
            if new:
                added.append(info)
            else:
                duplicates += 1
    except BaseException:
        for info in added:
            try:
                buffer.remove(info.id)
            except OSError:
                pass  # a read-only buffer cannot have taken the clip in the first place
        raise
    return [info.to_dict() for info in added], duplicates


@router.delete("/v1/clips", summary="Empty the clip buffer", dependencies=[RequireApiKey], responses=AUTH_ERRORS)
async def clear_clips(plane: AdaptationDep) -> dict[str, Any]:
    """Remove every buffered clip (training and held-out)."""
    removed = await run_in_threadpool(plane.buffer.clear)
    return {"removed": removed}
