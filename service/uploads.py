"""Uploaded videos: the streaming multipart receiver (the segmentation loop is ``service.video_segmenter``).

``receive_upload`` parses a ``multipart/form-data`` body as it arrives and writes the ``video`` part
to disk in chunks, stopping with 413 as soon as the byte limit is passed (a ``Content-Length`` over
the limit is refused before a single body byte is read); nothing is ever held whole in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .deps import ApiError

FIELD = "video"  # the multipart field that carries the video
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small extra fields allowed on top of the limit
WRITE_CHUNK = 1 << 20
MEDIA_TYPES = {"zip": "application/zip", "mp4": "video/mp4", "json": "application/json"}


@dataclass(frozen=True)
class Upload:
    path: Path
    filename: str
    size: int


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the upload is larger than the limit of {limit} bytes "
                                              f"({limit / 2**20:.1f} MiB)")


class PartHeaders:
    """Collects the headers of the current multipart part (``python_multipart`` callbacks) and reads the
    field name and filename from its Content-Disposition."""

    def __init__(self) -> None:
        self._field = self._value = self._disposition = b""

    def begin(self) -> None:
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field = self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {"on_header_field": self.on_header_field, "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end}

    def name_and_filename(self) -> tuple[str, str]:
        _, options = parse_options_header(self._disposition)
        return (options.get(b"name", b"").decode("utf-8", "replace"),
                options.get(b"filename", b"").decode("utf-8", "replace"))


def multipart_boundary(request: Request, max_bytes: int, expected: str) -> bytes:
    """The boundary of a ``multipart/form-data`` request: 415 for another type (``expected`` says what
    to send), 400 without a boundary, 413 when the declared ``Content-Length`` is already over the limit."""
    media, params = parse_options_header(request.headers.get("content-type"))
    if media != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"send {expected} as multipart/form-data (got Content-Type "
                                                      f"{media.decode('latin-1') or 'none'})")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data body without a boundary parameter")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)
    return boundary


async def feed_parser(request: Request, parser: MultipartParser, max_bytes: int,
                      after_chunk: Callable[[], Awaitable[None]] | None = None) -> None:
    """Feed the body to ``parser`` as it arrives: 413 once it passes ``max_bytes`` (plus the multipart
    overhead), 400 when it is malformed. ``after_chunk`` runs after each chunk (e.g. to flush to disk)."""
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + MULTIPART_OVERHEAD:
                raise _too_large(max_bytes)
            parser.write(chunk)
            if after_chunk is not None:
                await after_chunk()
        parser.finalize()
    except FormParserError as e:
        raise ApiError(400, "bad_request", f"malformed multipart body: {e}") from e


async def receive_upload(request: Request, dest: Path, max_bytes: int) -> Upload:
    """Stream the ``video`` part of a multipart body into ``dest``; raise ``ApiError`` 413/415/400/422."""
    boundary = multipart_boundary(request, max_bytes, f"the video in a file field named '{FIELD}'")
    part: dict[str, Any] = {}
    names: list[str] = []
    pending: list[bytes] = []
    state = {"video_parts": 0, "video_bytes": 0, "filename": ""}
    headers = PartHeaders()

    def on_part_begin() -> None:
        part.clear()
        headers.begin()

    def on_headers_finished() -> None:
        name, filename = headers.name_and_filename()
        names.append(name)
        part["is_video"] = name == FIELD
        if part["is_video"]:
            state["video_parts"] += 1
            state["filename"] = filename

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.get("is_video") and state["video_parts"] == 1:
            pending.append(bytes(data[start:end]))
            state["video_bytes"] += end - start

    callbacks = {"on_part_begin": on_part_begin, **headers.callbacks(), "on_headers_finished": on_headers_finished,
                 "on_part_data": on_part_data}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    with open(dest, "wb") as out:

        async def flush() -> None:
            if state["video_bytes"] > max_bytes:
                raise _too_large(max_bytes)
            if sum(map(len, pending)) >= WRITE_CHUNK:
                await run_in_threadpool(out.writelines, pending[:])
                pending.clear()

        await feed_parser(request, parser, max_bytes, flush)
        await run_in_threadpool(out.writelines, pending[:])
    if state["video_parts"] == 0:
        got = ", ".join(repr(n) for n in names) or "no parts"
        raise ApiError(422, "missing_video", f"the multipart body has no '{FIELD}' field (got {got})")
    if state["video_parts"] > 1:
        raise ApiError(422, "invalid_request", f"send exactly one '{FIELD}' part, got {state['video_parts']}")
    if state["video_bytes"] == 0:
        raise ApiError(415, "unsupported_media_type", "the uploaded video is empty (0 bytes)")
    return Upload(dest, state["filename"], state["video_bytes"])
