"""The blocking client: ``Client`` (HTTP with httpx, the stream with websockets' sync API)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from . import _common as c
from .errors import ServerUnreachable, StreamError, TimedOut, VSSError
from .frames import Frame, encode_frame
from .progress import Progress, resolve
from .types import AdaptJob, ModelInfo, SegmentJob, SegmentResult, ServingModel, StreamResult, write_atomic


class Client:
    """A vss server at ``url`` (default ``$VSS_URL`` or http://127.0.0.1:8000).

    ``api_key`` (default ``$VSS_API_KEY``) is sent as a bearer token; ``timeout`` bounds each HTTP
    request in seconds (a synchronous segmentation answers only when it is done).
    """

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = c.base_url(url)
        self._headers = c.headers(api_key)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self.models = Models(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------
    @contextmanager
    def _open(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response with a success status; errors become ``APIError`` / ``ServerUnreachable``."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise c.api_error(response)
                yield response
        except httpx.TimeoutException as e:
            raise TimedOut(f"{method} {self.url}{path}: no answer in time ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach {self.url}: {e}") from e

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._open(method, path, **kwargs) as response:
            response.read()
            return response.json()

    def health(self) -> dict[str, Any]:
        """``GET /readyz``: raises ``APIError`` (503 not_ready) until a model serves."""
        return cast(dict[str, Any], self._json("GET", "/readyz"))

    # --- segmentation -------------------------------------------------------------------------
    def segment(self, video: str | os.PathLike[str] | bytes | Any, *, format: str = "zip",
                output: str | os.PathLike[str] | None = None, filename: str | None = None,
                size: str | tuple[int, int] | None = None, stride: int = 1, max_frames: int | None = None,
                collect: bool = True, progress: Progress | bool | None = None, poll_interval: float = 0.5,
                timeout: float | None = None) -> SegmentResult:
        """Segment a video (a path, bytes or a binary file) into ``format`` zip, mp4 or json.

        Long videos become a server-side job: it is followed to its end, reporting
        ``progress(frames_done, frames_total)`` (``progress=True``: a tqdm bar), for at most ``timeout``
        seconds. With ``output`` the result is written there (atomically) instead of kept in memory.
        """
        params = c.segment_params(format, size, stride, max_frames, collect)
        upload = c.Upload(video, filename)
        with resolve(progress, "segment", "frame") as report:
            try:
                with self._open("POST", "/v1/segment", params=params, files=upload.files()) as response:
                    if response.status_code == 200:
                        result = self._result(response, format, output, None)
                        report(result.frames or 0, result.frames or 0)
                        return result
                    response.read()
                    job = cast(SegmentJob, response.json())
            finally:
                upload.close()
            job = self._follow(f"/v1/jobs/{job['id']}", job, c.segment_job_finished, report, "frames_done",
                               "frames_total", poll_interval, timeout)
        with self._open("GET", f"/v1/jobs/{job['id']}/result") as response:
            return self._result(response, format, output, job)

    def job(self, job_id: str) -> SegmentJob:
        """``GET /v1/jobs/{id}``: state, progress and ETA of a segmentation job."""
        return cast(SegmentJob, self._json("GET", f"/v1/jobs/{job_id}"))

    def _result(self, response: httpx.Response, fmt: str, output: str | os.PathLike[str] | None,
                job: SegmentJob | None) -> SegmentResult:
        frames = response.headers.get("x-frames")
        result = SegmentResult(format=fmt, filename=c.attachment_name(response, f"segmentation.{fmt}"),
                               model_version=response.headers.get("x-model-version") or None,
                               frames=int(frames) if frames and frames.isdigit() else None, job=job)
        if output is not None:
            result.path = Path(output)
            write_atomic(result.path, response.iter_bytes())
        else:
            result.content = response.read()
        return result

    def _follow(self, path: str, job: Any, finished: Any, report: Progress, done_key: str, total_key: str,
                poll_interval: float, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            report(int(job.get(done_key) or 0), int(job.get(total_key) or 0))
            if finished(job):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimedOut(f"job {job['id']} still {job.get('state')} after {timeout:g} s")
            time.sleep(poll_interval)
            job = self._json("GET", path)

    # --- adaptation ---------------------------------------------------------------------------
    def add_clips(self, video: str | os.PathLike[str] | bytes | Any, *, filename: str | None = None,
                  clip_frames: int | None = None, stride: int = 1, max_frames: int = 256) -> dict[str, Any]:
        """``POST /v1/clips``: cut a target video into clips of the adaptation buffer."""
        params = {"stride": str(stride), "max_frames": str(max_frames)}
        if clip_frames is not None:
            params["clip_frames"] = str(clip_frames)
        upload = c.Upload(video, filename)
        try:
            return cast(dict[str, Any], self._json("POST", "/v1/clips", params=params, files=upload.files()))
        finally:
            upload.close()

    def clips(self) -> dict[str, Any]:
        """``GET /v1/clips``: what the clip buffer holds."""
        return cast(dict[str, Any], self._json("GET", "/v1/clips"))

    def adapt(self, method: str = "tent", *, steps: int = 100, lr: float | None = None,
              time_budget_s: float | None = None, batch_size: int | None = None, seed: int = 0,
              options: dict[str, Any] | None = None, wait: bool = True, progress: Progress | bool | None = None,
              poll_interval: float = 1.0, timeout: float | None = None) -> AdaptJob:
        """Start an adaptation job on the server's clip buffer; with ``wait`` follow it to its end.

        Returns the final job (``state`` published, with the new ``version``, or rejected, with the
        gate's reasons); raises ``JobFailed`` when it fails or is cancelled.
        """
        body = c.adapt_body(method, steps, lr, time_budget_s, batch_size, seed, options)
        job = cast(AdaptJob, self._json("POST", "/v1/adapt", json=body))
        if not wait:
            return job
        with resolve(progress, f"adapt {method}", "step") as report:
            return cast(AdaptJob, self._follow(f"/v1/adapt/{job['id']}", job, c.adapt_job_finished, report,
                                               "step", "steps", poll_interval, timeout))

    def adapt_job(self, job_id: str) -> AdaptJob:
        return cast(AdaptJob, self._json("GET", f"/v1/adapt/{job_id}"))

    def adapt_jobs(self) -> list[AdaptJob]:
        return cast(list[AdaptJob], self._json("GET", "/v1/adapt")["jobs"])

    def cancel_adapt(self, job_id: str) -> AdaptJob:
        return cast(AdaptJob, self._json("POST", f"/v1/adapt/{job_id}/cancel"))

    # --- streaming ----------------------------------------------------------------------------
    def stream(self, frames: Iterable[Frame], *, format: str = "rle", size: tuple[int, int] | None = None,
               collect: bool = True, in_flight: int = 1, reconnect: bool = True,
               reconnect_timeout: float = 60.0, reply_timeout: float = 120.0) -> FrameStream:
        """Segment an iterable of frames over ``WS /v1/stream``; iterate the result for ``StreamResult``s.

        ``in_flight`` frames are sent ahead of the replies (1: every frame is answered; more: higher
        throughput, and the server may drop stale frames, whose indices are then skipped). When the
        server closes with 1012 (restart), 1001, 1013 or the connection drops, the stream reconnects
        for up to ``reconnect_timeout`` seconds, sends its config again and resends the frames in flight;
        the first reply after a reconnect is a keyframe.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        return FrameStream(self, frames, c.stream_config(format, size, collect), in_flight, reconnect,
                           reconnect_timeout, reply_timeout)


class Models:
    """``client.models``: list, describe, see what is serving, activate (deploy or roll back)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def listing(self) -> dict[str, Any]:
        """``GET /v1/models``: ``{"active", "serving", "versions"}`` (``list`` returns the versions only)."""
        return cast(dict[str, Any], self._client._json("GET", "/v1/models"))

    def list(self) -> list[ModelInfo]:
        return cast(list[ModelInfo], self._client._json("GET", "/v1/models")["versions"])

    def get(self, version: str) -> ModelInfo:
        return cast(ModelInfo, self._client._json("GET", f"/v1/models/{version}"))

    def active(self) -> ServingModel:
        return cast(ServingModel, self._client._json("GET", "/v1/models/active"))

    def activate(self, version: str) -> ServingModel:
        return cast(ServingModel, self._client._json("POST", f"/v1/models/{version}/activate"))

    def retire(self, version: str, retired: bool = True) -> dict[str, Any]:
        """Stop (``retired=False``: resume) routing streams and uploads to a per-domain version."""
        action = "retire" if retired else "unretire"
        return cast("dict[str, Any]", self._client._json("POST", f"/v1/models/{version}/{action}"))


class FrameStream:
    """An iterator of ``StreamResult``s; ``classes``, ``palette`` and ``reconnects`` describe the session."""

    def __init__(self, client: Client, frames: Iterable[Frame], config: str, in_flight: int, reconnect: bool,
                 reconnect_timeout: float, reply_timeout: float) -> None:
        self._url, self._headers = c.ws_url(client.url), client._headers
        self._config, self._in_flight, self._reconnect = config, in_flight, reconnect
        self._reconnect_timeout, self._reply_timeout = reconnect_timeout, reply_timeout
        self.book = c.StreamBook()
        self._results = self._run(iter(frames))

    @property
    def classes(self) -> list[str]:
        return list(self.book.ready.get("classes") or [])

    @property
    def palette(self) -> list[list[int]]:
        return list(self.book.ready.get("palette") or [])

    @property
    def reconnects(self) -> int:
        return self.book.reconnects

    @property
    def disconnects(self) -> list[StreamError]:
        """Why each connection that was replaced ended (close code, the server's error code and message)."""
        return list(self.book.disconnects)

    def __iter__(self) -> FrameStream:
        return self

    def __next__(self) -> StreamResult:
        return next(self._results)

    def close(self) -> None:
        self._results.close()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, ws: ClientConnection) -> str | bytes:
        try:
            return ws.recv(timeout=self._reply_timeout)
        except TimeoutError as e:
            raise TimedOut(f"no reply from {self._url} in {self._reply_timeout:g} s") from e

    def _server_error(self, ws: ClientConnection, message: dict[str, Any]) -> StreamError:
        error = message.get("error") or {}
        code: int | None = None
        try:
            ws.recv(timeout=5)
        except ConnectionClosed as e:
            code = c.close_code(e)[0]
        except TimeoutError:
            pass
        return StreamError(code, str(error.get("code", "error")), str(error.get("message", "")))

    def _connect(self, first: bool) -> ClientConnection:
        deadline, delay = time.monotonic() + self._reconnect_timeout, 0.1
        while True:
            err: VSSError
            try:
                ws = connect(self._url, additional_headers=self._headers, max_size=None, open_timeout=10,
                             compression=None)
                ws.__enter__()  # we close it ourselves; entering marks it managed (websockets >= 17.1 warns otherwise)
            except InvalidURI as e:
                raise VSSError(f"bad stream URL {self._url}: {e}") from e
            except (OSError, InvalidHandshake) as e:
                err = ServerUnreachable(f"cannot open {self._url}: {e}")
            else:
                try:
                    ws.send(self._config)
                    ready = c.parse_text(self._recv(ws), "ready")
                    if ready.get("type") == "error":
                        raise self._server_error(ws, ready)
                    for data in self.book.connected(ready):
                        ws.send(data)
                    self.book.reconnects += 0 if first else 1
                    return ws
                except ConnectionClosed as e:
                    code, reason = c.close_code(e)
                    err = StreamError(code, "closed", reason or "closed during the handshake")
                except StreamError as e:
                    err = e
                ws.close()
                if isinstance(err, StreamError) and err.close_code not in c.RECONNECT_CODES:
                    raise err
            if first:
                raise err
            if time.monotonic() + delay > deadline:
                raise TimedOut(f"{self._url} did not come back within {self._reconnect_timeout:g} s: {err}") from err
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _run(self, frames: Iterator[Frame]) -> Iterator[StreamResult]:
        book, exhausted = self.book, False
        ws = self._connect(first=True)
        try:
            while True:
                try:
                    while not exhausted and len(book.pending) < self._in_flight:
                        frame = next(frames, None)
                        if frame is None:
                            exhausted = True
                            break
                        data = encode_frame(frame)
                        book.sent(data)
                        ws.send(data)
                    if not book.pending:
                        return
                    meta = c.parse_text(self._recv(ws), "reply")
                    if meta.get("type") == "error":  # e.g. "draining", then close 1012: reconnect
                        error = self._server_error(ws, meta)
                        if not self._reconnect or error.close_code not in c.RECONNECT_CODES:
                            raise error
                        book.disconnects.append(error)
                        ws.close()
                        ws = self._connect(first=False)
                        continue
                    result = book.answer(meta, cast(bytes, self._recv(ws)))
                except ConnectionClosed as e:
                    code, reason = c.close_code(e)
                    error = StreamError(code, "closed", reason or "the server closed the stream")
                    if not self._reconnect or code not in c.RECONNECT_CODES:
                        raise error from e
                    book.disconnects.append(error)
                    ws.close()
                    ws = self._connect(first=False)
                    continue
                yield result
        finally:
            ws.close()
