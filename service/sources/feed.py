"""Bounded hand-offs of a source: decoded frames to its worker, results to each websocket subscriber.

Both drop the OLDEST waiting entry when full, so a slow model or a slow subscriber never makes the
source fall behind live or grow its memory: what is delivered is always the freshest.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


class FrameQueue:
    """Decoded frames waiting for the source's worker thread (thread-safe, drop-oldest)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()

    def put(self, item: Any) -> bool:
        """Queue ``item``; True when the oldest waiting frame was dropped to make room."""
        with self._cond:
            dropped = len(self._items) >= self.size
            if dropped:
                self._items.popleft()
            self._items.append(item)
            self._cond.notify()
        return dropped

    def get(self, timeout: float) -> Any | None:
        """The oldest waiting frame, or None after ``timeout`` seconds without one."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._cond:
            self._items.clear()


class Subscriber:
    """One results websocket: messages from the source's threads, read by the websocket's event loop.

    Messages are ``("frame", meta, label_blob)``, ``("state", info)`` and ``("end", info)``; when
    ``size`` frames wait, the oldest frame is dropped (state messages are never dropped).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fmt: str, size: int) -> None:
        self.loop, self.format, self.size = loop, fmt, size
        self.dropped = 0
        self._items: deque[tuple[Any, ...]] = deque()
        self._ready = asyncio.Event()

    def offer(self, message: tuple[Any, ...]) -> None:
        """Deliver from any thread (a no-op once the subscriber's loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self._put, message)
        except RuntimeError:
            pass  # the event loop is gone: nobody is listening any more

    def _put(self, message: tuple[Any, ...]) -> None:
        if message[0] == "frame" and sum(m[0] == "frame" for m in self._items) >= self.size:
            for i, waiting in enumerate(self._items):
                if waiting[0] == "frame":
                    del self._items[i]
                    self.dropped += 1
                    break
        self._items.append(message)
        self._ready.set()

    async def get(self) -> tuple[Any, ...]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()
