"""The asyncio client: ``AsyncClient`` has the methods of ``Client`` as coroutines."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any, cast

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import _common as c
from .errors import ServerUnreachable, StreamError, TimedOut, VSSError
from .frames import Frame, encode_frame
from .progress import Progress, resolve
from .types import AdaptJob, ModelInfo, SegmentJob, SegmentResult, ServingModel, StreamResult, write_atomic


class AsyncClient:
    """Like ``Client``, for asyncio code: ``async with AsyncClient(url) as vss: await vss.segment(...)``."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = c.base_url(url)
        self._headers = c.headers(api_key)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, transport=transport,
                                       timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self.models = AsyncModels(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.send(self._http.build_request(method, path, **kwargs), stream=True)
        except httpx.TimeoutException as e:
            raise TimedOut(f"{method} {self.url}{path}: no answer in time ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach {self.url}: {e}") from e
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise c.api_error(response)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        try:
            await response.aread()
            return response.json()
        finally:
            await response.aclose()

    async def health(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._json("GET", "/readyz"))

    async def segment(self, video: str | os.PathLike[str] | bytes | Any, *, format: str = "zip",
                      output: str | os.PathLike[str] | None = None, filename: str | None = None,
                      size: str | tuple[int, int] | None = None, stride: int = 1, max_frames: int | None = None,
                      collect: bool = True, progress: Progress | bool | None = None, poll_interval: float = 0.5,
                      timeout: float | None = None) -> SegmentResult:
        """See ``Client.segment``."""
        params = c.segment_params(format, size, stride, max_frames, collect)
        upload = c.Upload(video, filename)
        with resolve(progress, "segment", "frame") as report:
            try:
                response = await self._send("POST", "/v1/segment", params=params, files=upload.files())
            finally:
                upload.close()
            if response.status_code == 200:
                result = await self._result(response, format, output, None)
                report(result.frames or 0, result.frames or 0)
                return result
            await response.aread()
            await response.aclose()
            job = cast(SegmentJob, response.json())
            job = await self._follow(f"/v1/jobs/{job['id']}", job, c.segment_job_finished, report, "frames_done",
                                     "frames_total", poll_interval, timeout)
        response = await self._send("GET", f"/v1/jobs/{job['id']}/result")
        return await self._result(response, format, output, job)

    async def job(self, job_id: str) -> SegmentJob:
        return cast(SegmentJob, await self._json("GET", f"/v1/jobs/{job_id}"))

    async def _result(self, response: httpx.Response, fmt: str, output: str | os.PathLike[str] | None,
                      job: SegmentJob | None) -> SegmentResult:
        try:
            frames = response.headers.get("x-frames")
            result = SegmentResult(format=fmt, filename=c.attachment_name(response, f"segmentation.{fmt}"),
                                   model_version=response.headers.get("x-model-version") or None,
                                   frames=int(frames) if frames and frames.isdigit() else None, job=job)
            content = await response.aread()
        finally:
            await response.aclose()
        if output is not None:
            result.path = Path(output)
            await asyncio.to_thread(write_atomic, result.path, iter([content]))
        else:
            result.content = content
        return result

    async def _follow(self, path: str, job: Any, finished: Any, report: Progress, done_key: str, total_key: str,
                      poll_interval: float, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            report(int(job.get(done_key) or 0), int(job.get(total_key) or 0))
            if finished(job):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimedOut(f"job {job['id']} still {job.get('state')} after {timeout:g} s")
            await asyncio.sleep(poll_interval)
            job = await self._json("GET", path)

    async def add_clips(self, video: str | os.PathLike[str] | bytes | Any, *, filename: str | None = None,
                        clip_frames: int | None = None, stride: int = 1, max_frames: int = 256) -> dict[str, Any]:
        params = {"stride": str(stride), "max_frames": str(max_frames)}
        if clip_frames is not None:
            params["clip_frames"] = str(clip_frames)
        upload = c.Upload(video, filename)
        try:
            return cast(dict[str, Any], await self._json("POST", "/v1/clips", params=params, files=upload.files()))
        finally:
            upload.close()

    async def clips(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._json("GET", "/v1/clips"))

    async def adapt(self, method: str = "tent", *, steps: int = 100, lr: float | None = None,
                    time_budget_s: float | None = None, batch_size: int | None = None, seed: int = 0,
                    options: dict[str, Any] | None = None, wait: bool = True, progress: Progress | bool | None = None,
                    poll_interval: float = 1.0, timeout: float | None = None) -> AdaptJob:
        """See ``Client.adapt``."""
        body = c.adapt_body(method, steps, lr, time_budget_s, batch_size, seed, options)
        job = cast(AdaptJob, await self._json("POST", "/v1/adapt", json=body))
        if not wait:
            return job
        with resolve(progress, f"adapt {method}", "step") as report:
            return cast(AdaptJob, await self._follow(f"/v1/adapt/{job['id']}", job, c.adapt_job_finished, report,
                                                     "step", "steps", poll_interval, timeout))

    async def adapt_job(self, job_id: str) -> AdaptJob:
        return cast(AdaptJob, await self._json("GET", f"/v1/adapt/{job_id}"))

    async def adapt_jobs(self) -> list[AdaptJob]:
        return cast(list[AdaptJob], (await self._json("GET", "/v1/adapt"))["jobs"])

    async def cancel_adapt(self, job_id: str) -> AdaptJob:
        return cast(AdaptJob, await self._json("POST", f"/v1/adapt/{job_id}/cancel"))

    def stream(self, frames: Iterable[Frame] | AsyncIterable[Frame], *, format: str = "rle",
               size: tuple[int, int] | None = None, collect: bool = True, in_flight: int = 1, reconnect: bool = True,
               reconnect_timeout: float = 60.0, reply_timeout: float = 120.0) -> AsyncFrameStream:
        """See ``Client.stream``; ``async for result in vss.stream(frames)``."""
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        return AsyncFrameStream(self, frames, c.stream_config(format, size, collect), in_flight, reconnect,
                                reconnect_timeout, reply_timeout)


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def listing(self) -> dict[str, Any]:
        """``GET /v1/models``: ``{"active", "serving", "versions"}``."""
        return cast(dict[str, Any], await self._client._json("GET", "/v1/models"))

    async def list(self) -> list[ModelInfo]:
        return cast(list[ModelInfo], (await self._client._json("GET", "/v1/models"))["versions"])

    async def get(self, version: str) -> ModelInfo:
        return cast(ModelInfo, await self._client._json("GET", f"/v1/models/{version}"))

    async def active(self) -> ServingModel:
        return cast(ServingModel, await self._client._json("GET", "/v1/models/active"))

    async def activate(self, version: str) -> ServingModel:
        return cast(ServingModel, await self._client._json("POST", f"/v1/models/{version}/activate"))

    async def retire(self, version: str, retired: bool = True) -> dict[str, Any]:
        """Stop (``retired=False``: resume) routing streams and uploads to a per-domain version."""
        action = "retire" if retired else "unretire"
        return cast("dict[str, Any]", await self._client._json("POST", f"/v1/models/{version}/{action}"))


async def _aiter(frames: Iterable[Frame] | AsyncIterable[Frame]) -> AsyncIterator[Frame]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame


class AsyncFrameStream:
    """An async iterator of ``StreamResult``s (see ``FrameStream``)."""

    def __init__(self, client: AsyncClient, frames: Iterable[Frame] | AsyncIterable[Frame], config: str,
                 in_flight: int, reconnect: bool, reconnect_timeout: float, reply_timeout: float) -> None:
        self._url, self._headers = c.ws_url(client.url), client._headers
        self._config, self._in_flight, self._reconnect = config, in_flight, reconnect
        self._reconnect_timeout, self._reply_timeout = reconnect_timeout, reply_timeout
        self.book = c.StreamBook()
        self._results = self._run(_aiter(frames))

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

    def __aiter__(self) -> AsyncFrameStream:
        return self

    async def __anext__(self) -> StreamResult:
        return await self._results.__anext__()

    async def aclose(self) -> None:
        await self._results.aclose()

    async def __aenter__(self) -> AsyncFrameStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _recv(self, ws: ClientConnection, timeout: float | None = None) -> str | bytes:
        limit = self._reply_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(ws.recv(), limit)
        except TimeoutError as e:
            raise TimedOut(f"no reply from {self._url} in {limit:g} s") from e

    async def _server_error(self, ws: ClientConnection, message: dict[str, Any]) -> StreamError:
        error = message.get("error") or {}
        code: int | None = None
        try:
            await self._recv(ws, 5)
        except ConnectionClosed as e:
            code = c.close_code(e)[0]
        except TimedOut:
            pass
        return StreamError(code, str(error.get("code", "error")), str(error.get("message", "")))

    async def _connect(self, first: bool) -> ClientConnection:
        deadline, delay = time.monotonic() + self._reconnect_timeout, 0.1
        while True:
            err: VSSError
            try:
                ws = await connect(self._url, additional_headers=self._headers, max_size=None, open_timeout=10,
                                   compression=None)
            except InvalidURI as e:
                raise VSSError(f"bad stream URL {self._url}: {e}") from e
            except (OSError, InvalidHandshake) as e:
                err = ServerUnreachable(f"cannot open {self._url}: {e}")
            else:
                try:
                    await ws.send(self._config)
                    ready = c.parse_text(await self._recv(ws), "ready")
                    if ready.get("type") == "error":
                        raise await self._server_error(ws, ready)
                    for data in self.book.connected(ready):
                        await ws.send(data)
                    self.book.reconnects += 0 if first else 1
                    return ws
                except ConnectionClosed as e:
                    code, reason = c.close_code(e)
                    err = StreamError(code, "closed", reason or "closed during the handshake")
                except StreamError as e:
                    err = e
                await ws.close()
                if isinstance(err, StreamError) and err.close_code not in c.RECONNECT_CODES:
                    raise err
            if first:
                raise err
            if time.monotonic() + delay > deadline:
                raise TimedOut(f"{self._url} did not come back within {self._reconnect_timeout:g} s: {err}") from err
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _run(self, frames: AsyncIterator[Frame]) -> AsyncIterator[StreamResult]:
        book, exhausted = self.book, False
        ws = await self._connect(first=True)
        try:
            while True:
                try:
                    while not exhausted and len(book.pending) < self._in_flight:
                        try:
                            frame = await frames.__anext__()
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        data = encode_frame(frame)
                        book.sent(data)
                        await ws.send(data)
                    if not book.pending:
                        return
                    meta = c.parse_text(await self._recv(ws), "reply")
                    if meta.get("type") == "error":  # e.g. "draining", then close 1012: reconnect
                        error = await self._server_error(ws, meta)
                        if not self._reconnect or error.close_code not in c.RECONNECT_CODES:
                            raise error
                        book.disconnects.append(error)
                        await ws.close()
                        ws = await self._connect(first=False)
                        continue
                    result = book.answer(meta, cast(bytes, await self._recv(ws)))
                except ConnectionClosed as e:
                    code, reason = c.close_code(e)
                    error = StreamError(code, "closed", reason or "the server closed the stream")
                    if not self._reconnect or code not in c.RECONNECT_CODES:
                        raise error from e
                    book.disconnects.append(error)
                    await ws.close()
                    ws = await self._connect(first=False)
                    continue
                yield result
        finally:
            await ws.close()
