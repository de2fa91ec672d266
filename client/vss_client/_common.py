"""Pure helpers shared by the sync and the async client: URLs, headers, error bodies, request bodies,
and the bookkeeping of a stream's frames in flight."""

from __future__ import annotations

import json
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed

from . import __version__
from .errors import APIError, StreamError
from .labels import decode_labels
from .types import StreamResult

DEFAULT_URL = "http://127.0.0.1:8000"
Progress = Callable[[int, int], None]  # progress(done, total): frames for segment, steps for adapt
SEGMENT_FORMATS = ("zip", "mp4", "json")
STREAM_FORMATS = ("png", "rle")
# Close codes after which a stream reconnects: going away, abnormal closure (the connection dropped
# without a close frame), service restart, try again later (the restarted server has no model yet).
RECONNECT_CODES = frozenset({1001, 1006, 1012, 1013})


def base_url(url: str | None) -> str:
    """The server's root URL: ``url``, else ``$VSS_URL``, else http://127.0.0.1:8000 (no trailing slash)."""
    url = url or os.environ.get("VSS_URL") or DEFAULT_URL
    if not re.match(r"^https?://", url):
        raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def ws_url(url: str, path: str = "/v1/stream") -> str:
    return "ws" + url[len("http"):] + path


def headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("VSS_API_KEY")
    out = {"User-Agent": f"vss-client/{__version__}"}
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


def api_error(response: httpx.Response) -> APIError:
    """The server's ``{"error": {"code", "message", "request_id", ...}}`` as an exception."""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        details = {k: v for k, v in error.items() if k not in ("code", "message", "request_id")}
        return APIError(response.status_code, str(error.get("code", "error")), str(error.get("message", "")),
                        error.get("request_id") or request_id, details)
    text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
    return APIError(response.status_code, f"http_{response.status_code}", text, request_id)


def segment_params(fmt: str, size: str | tuple[int, int] | None, stride: int, max_frames: int | None,
                   collect: bool) -> dict[str, str]:
    if fmt not in SEGMENT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SEGMENT_FORMATS)}, got {fmt!r}")
    params = {"format": fmt, "stride": str(stride), "collect": "true" if collect else "false"}
    if size is not None:
        params["size"] = size if isinstance(size, str) else f"{size[0]}x{size[1]}"
    if max_frames is not None:
        params["max_frames"] = str(max_frames)
    return params


def attachment_name(response: httpx.Response, default: str) -> str:
    match = re.search(r'filename="?([^";]+)"?', response.headers.get("content-disposition", ""))
    return match.group(1) if match else default


def adapt_body(method: str, steps: int, lr: float | None, time_budget_s: float | None, batch_size: int | None,
               seed: int, options: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"method": method, "steps": steps, "seed": seed, "options": dict(options or {})}
    for key, value in (("lr", lr), ("time_budget_s", time_budget_s), ("batch_size", batch_size)):
        if value is not None:
            body[key] = value
    return body


def stream_config(fmt: str, size: tuple[int, int] | None, collect: bool) -> str:
    if fmt not in STREAM_FORMATS:
        raise ValueError(f"format must be 'png' or 'rle', got {fmt!r}")
    config: dict[str, Any] = {"format": fmt, "collect": collect}
    if size is not None:
        config["size"] = [int(size[0]), int(size[1])]
    return json.dumps(config)


@dataclass
class _Sent:
    local: int  # index on the current connection (the server's ``frame``)
    index: int  # index in the caller's iterable
    data: bytes


class StreamBook:
    """Which frames are in flight on the current connection, and what a reply answers.

    The server numbers frames per connection and may drop stale ones (the reply's ``frame`` then skips
    them); after a reconnect the frames still in flight are sent again on the new connection.
    """

    def __init__(self) -> None:
        self.pending: deque[_Sent] = deque()
        self.local = 0  # frames sent on the current connection
        self.next_index = 0  # frames taken from the caller's iterable
        self.ready: dict[str, Any] = {}
        self.reconnects = 0
        self.disconnects: list[StreamError] = []  # why each connection ended before the stream did

    def sent(self, data: bytes) -> None:
        self.pending.append(_Sent(self.local, self.next_index, data))
        self.local += 1
        self.next_index += 1

    def connected(self, ready: dict[str, Any]) -> list[bytes]:
        """A (re)connection is ready: renumber the frames in flight; returns them, to be sent again."""
        if ready.get("type") != "ready":
            raise StreamError(None, "protocol", f"expected the server's ready message, got {ready!r}")
        self.ready = ready
        self.local = 0
        for item in self.pending:
            item.local = self.local
            self.local += 1
        return [item.data for item in self.pending]

    def answer(self, meta: dict[str, Any], blob: bytes) -> StreamResult:
        """The reply ``meta`` + label map ``blob`` -> a result; frames it skipped were dropped by the server."""
        if meta.get("type") == "error":
            error = meta.get("error") or {}
            raise StreamError(None, str(error.get("code", "error")), str(error.get("message", "")))
        if meta.get("type") != "frame":
            raise StreamError(None, "protocol", f"unexpected message {meta!r}")
        local = int(meta["frame"])
        while self.pending and self.pending[0].local < local:
            self.pending.popleft()
        if not self.pending or self.pending[0].local != local:
            raise StreamError(None, "protocol", f"a reply for frame {local}, which is not in flight")
        item = self.pending.popleft()
        return StreamResult(
            index=item.index, labels=decode_labels(blob, str(meta.get("format", "png"))),
            model_version=str(meta.get("model_version")), keyframe=bool(meta.get("keyframe")),
            latency_ms=float(meta.get("latency_ms", 0.0)), compute_ms=float(meta.get("compute_ms", 0.0)),
            class_fractions=dict(meta.get("class_fractions") or {}), dropped=int(meta.get("dropped", 0)),
            classes=list(self.ready.get("classes") or []), palette=list(self.ready.get("palette") or []), meta=meta)


def parse_text(message: str | bytes, what: str) -> dict[str, Any]:
    if not isinstance(message, str):
        raise StreamError(None, "protocol", f"expected a text {what} message, got {len(message)} bytes")
    data = json.loads(message)
    if not isinstance(data, dict):
        raise StreamError(None, "protocol", f"expected a JSON object as the {what} message")
    return data


class Upload:
    """The multipart ``video`` field of a path, bytes or an open binary file (closed if opened here)."""

    def __init__(self, video: str | os.PathLike[str] | bytes | Any, filename: str | None) -> None:
        self._owned = None
        if isinstance(video, bytes | bytearray | memoryview):
            import io

            self.name, self.file = filename or "video.mp4", io.BytesIO(bytes(video))
        elif isinstance(video, str | os.PathLike):
            path = os.fspath(video)
            self._owned = self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
            self.name = filename or os.path.basename(path)
        else:  # a binary file object
            self.name, self.file = filename or os.path.basename(str(getattr(video, "name", "video.mp4"))), video

    def files(self) -> dict[str, tuple[str, Any, str]]:
        return {"video": (self.name, self.file, "application/octet-stream")}

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


def segment_job_finished(job: dict[str, Any]) -> bool:
    """True once a segmentation job is done; raises ``JobFailed`` for a failed one."""
    from .errors import JobFailed

    if job.get("state") == "failed":
        raise JobFailed(job)
    return job.get("state") == "done"


def adapt_job_finished(job: dict[str, Any]) -> bool:
    """True once an adaptation job ended (published or rejected); raises ``JobFailed`` for failed/cancelled."""
    from .errors import JobFailed
    from .types import ADAPT_FINAL

    if job.get("state") in ("failed", "cancelled"):
        raise JobFailed(job)
    return job.get("state") in ADAPT_FINAL


def close_code(error: ConnectionClosed) -> tuple[int, str]:
    """(code, reason) of a closed websocket; 1006 when no close frame was received."""
    if error.rcvd is None:
        return 1006, "the connection dropped"
    return int(error.rcvd.code), str(error.rcvd.reason)
