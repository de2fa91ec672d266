"""Draining: what one server process does between SIGTERM and its exit.

``vss serve`` runs uvicorn with a drain in front of uvicorn's own shutdown. On the first SIGTERM
(or Ctrl+C):

1. ``Drain.begin()``: ``/readyz`` answers 503, so the load balancer stops routing here; new work
   (uploads, streams, adaptation jobs, clips: ``NEW_WORK``) is refused with 503 + ``Retry-After``;
   every HTTP response carries ``Connection: close``, so keep-alive clients reconnect (elsewhere);
2. every open stream finishes the frame in hand, sends ``{"type": "error", "error": {"code":
   "draining", ...}, "last_frame": N}`` and closes with 1012 (service restart);
3. in-flight uploads and other work requests finish, for at most ``VSS_DRAIN_TIMEOUT_S``;
4. then uvicorn's shutdown: stop listening, close idle connections, the app's lifespan shutdown.

A second signal skips the wait. ``Drain`` is plain state, driven from the event-loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("vss.drain")

# (method, path) of the routes that start work; "WS" for websockets.
NEW_WORK = frozenset({("POST", "/v1/segment"), ("POST", "/segment"), ("POST", "/v1/adapt"), ("POST", "/adapt"),
                      ("POST", "/v1/clips"), ("WS", "/v1/stream"), ("WS", "/stream")})
RETRY_AFTER_S = 1  # another replica can take the work at once
DRAIN_POLL_S = 0.05


def is_new_work(scope: Scope) -> bool:
    """True for a request that starts work this process would have to finish before exiting."""
    method = "WS" if scope["type"] == "websocket" else scope.get("method", "")
    path = scope.get("path", "")
    return (method, path.rstrip("/") or "/") in NEW_WORK


class Drain:
    """Whether this process is draining, how much work is in flight, and who to tell when it starts."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0  # requests and streams in NEW_WORK still running
        self._waiters: set[asyncio.Future[None]] = set()

    def begin(self) -> None:
        """Start draining (idempotent): refuse new work, tell every stream to close."""
        self.draining = True
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def started(self) -> asyncio.Future[None]:
        """A future of the running loop, done once draining begins (at once if it has)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.draining:
            future.set_result(None)
        else:
            self._waiters.add(future)
            future.add_done_callback(self._waiters.discard)
        return future

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no work is in flight; False when ``timeout_s`` ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return self.active == 0


class DrainMiddleware:
    """Refuses new work once draining (``refusal`` builds the 503) and counts the work in flight.

    Pure ASGI: a refused websocket gets an HTTP 503 to its upgrade request when the server supports
    the denial-response extension (uvicorn does), else a close before accept (HTTP 403).
    """

    def __init__(self, app: ASGIApp, drain: Drain, refusal: Callable[[], ASGIApp]) -> None:
        self.app, self.drain, self.refusal = app, drain, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        work = is_new_work(scope)
        if work and self.drain.draining:
            if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
                await self.refusal()(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1012})
            return
        if scope["type"] == "http":
            send = self._close_when_draining(send)
        if work:
            self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if work:
                self.drain.active -= 1

    def _close_when_draining(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return wrapped


class DrainingServer(uvicorn.Server):
    """uvicorn's server with ``drain`` run before its own shutdown (the sequence in the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain, self.drain_timeout_s = drain, drain_timeout_s
        self.signalled = False
        self.drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set flags. The signal is not recorded the way uvicorn records it, since
        # uvicorn re-raises recorded signals after its shutdown and the process would die of it (not exit 0).
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # uvicorn's rule: Ctrl+C during the shutdown stops waiting for connections
        if self.signalled:
            self.should_exit = True  # a second signal: stop waiting for the drain
        self.signalled = True

    async def on_tick(self, counter: int) -> bool:
        if self.signalled and self.drain_task is None:
            self.drain_task = asyncio.create_task(self.run_drain())
        return await super().on_tick(counter)

    async def run_drain(self) -> None:
        self.drain.begin()
        log.info("draining: new work refused, streams closed with 1012; waiting up to %.0f s for %d "
                 "request(s) in flight", self.drain_timeout_s, self.drain.active)
        if not await self.drain.wait_idle(self.drain_timeout_s):
            log.warning("drain timeout: %d request(s) still in flight are cut off", self.drain.active)
        self.should_exit = True
