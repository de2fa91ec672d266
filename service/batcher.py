"""Batching across streams: the per-frame network calls of concurrent streams and uploads run as one batch.

Every websocket stream and every upload keeps its own ``StreamSegmenter`` (the t-1 frame, the cached
t-1 logits, its frame order, flow and fusion); only the per-frame network call goes through the app's
``Batcher``: a caller submits its frames (N, 3, h, w) and blocks until its own rows of logits are back.
Requests that share the engine object and the input shape (channels, height, width, dtype) form a
group; a group runs as one ``engine.frame_logits`` call of at most ``max_batch`` frames, in arrival
order, as soon as it is full or ``max_wait_s`` after its oldest request arrived. Grouping by the engine
object means that a batch never mixes model versions: after a hot swap, frames on the new engine form
their own batches while a batch formed on the old engine finishes there, and each stream keyframes on
its first frame of the new version as before (``StreamSegmenter`` sees the version change).

The batcher has no thread of its own: the caller whose request is the oldest of its group leads it. It
waits on a condition until the group is full or its deadline passes, takes the group out, runs it under
the shared engine lock (the same FIFO lock that serialises the fusion calls), and hands every member its
rows. ``max_batch=1`` is the unbatched path of before: each call runs at once under the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(eq=False)
class _Request:
    engine: Any
    frames: np.ndarray
    deadline: float
    result: Any = None  # the engine's logits: an array, or a tensor on a torch engine's device
    error: BaseException | None = None
    done: bool = False

    def same_group(self, other: _Request) -> bool:
        """One engine object (hence one model version) and one input shape and dtype."""
        return (self.engine is other.engine and self.frames.shape[1:] == other.frames.shape[1:]
                and self.frames.dtype == other.frames.dtype)


@dataclass
class BatchStats:
    """What the batcher has run so far (for benchmarks, tests and logs)."""

    batches: int = 0  # engine calls made by the batcher
    frames: int = 0  # frames through those calls
    largest: int = 0  # most frames in one call

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


class Batcher:
    """Groups per-frame network calls of concurrent callers; see the module docstring.

    ``lock`` serialises every engine call (pass the app's engine lock); ``clock`` is the monotonic time
    source the deadlines are measured with (tests pass a fake one and call ``wake`` after moving it).
    """

    def __init__(self, max_batch: int = 1, max_wait_s: float = 0.0,
                 lock: AbstractContextManager[Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.lock: AbstractContextManager[Any] = lock if lock is not None else threading.Lock()
        self.clock = clock
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []  # arrival order; a request leaves it when its group is taken

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken into a batch."""
        with self._cond:
            return len(self._waiting)

    def wake(self) -> None:
        """Make waiting leaders look at the clock again (after a fake clock moved)."""
        with self._cond:
            self._cond.notify_all()

    def frame_logits(self, engine: Any, frames: np.ndarray) -> Any:
        """``engine.frame_logits(frames)``, possibly computed in one batch with other callers' frames."""
        if self.max_batch == 1 or len(frames) >= self.max_batch:
            with self.lock:
                logits = engine.frame_logits(frames)
            self._count(len(frames))
            return logits
        request = _Request(engine, frames, self.clock() + self.max_wait_s)
        group: list[_Request] | None = None
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()  # a leader of this group may now be full
            while not request.done:
                mine = [r for r in self._waiting if r.same_group(request)]
                if not mine or mine[0] is not request:
                    self._cond.wait()  # a follower: woken when its result is in or when it leads
                    continue
                group = self._ready(mine)
                if group is not None:
                    for r in group:
                        self._waiting.remove(r)
                    self._cond.notify_all()  # the next oldest of this group now leads the rest
                    break
                self._cond.wait(max(request.deadline - self.clock(), 0.0))
        if group is not None:
            self._run(group)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _ready(self, mine: list[_Request]) -> list[_Request] | None:
        """The leading requests of a group, if the group is full or past its deadline (else None)."""
        total = sum(len(r.frames) for r in mine)
        if total < self.max_batch and self.clock() < mine[0].deadline:
            return None
        taken, count = [], 0
        for r in mine:
            if taken and count + len(r.frames) > self.max_batch:
                break
            taken.append(r)
            count += len(r.frames)
        return taken

    def _run(self, group: list[_Request]) -> None:
        """One engine call for the group (in the leader's thread); every member gets its rows or the error."""
        frames = group[0].frames if len(group) == 1 else np.concatenate([r.frames for r in group])
        try:
            with self.lock:
                logits = group[0].engine.frame_logits(frames)
            if len(logits) != len(frames):
                raise RuntimeError(f"the engine returned {len(logits)} rows for a batch of {len(frames)} frames")
            start = 0
            for r in group:
                rows = logits[start:start + len(r.frames)]
                r.result = _own_copy(rows) if len(group) > 1 else rows  # a stream keeps only its own rows alive
                start += len(r.frames)
        except BaseException as e:  # noqa: BLE001 - every member of the batch raises it in its own thread
            for r in group:
                r.error = e
        with self._cond:
            for r in group:
                r.done = True
            self._count(len(frames))
            self._cond.notify_all()

    def _count(self, frames: int) -> None:
        with self._cond:  # reentrant: also called with it held
            self.stats.batches += 1
            self.stats.frames += frames
            self.stats.largest = max(self.stats.largest, frames)


def _own_copy(rows: Any) -> Any:
    """A copy of some rows of a batch's logits (an array, or a tensor on a torch engine's device)."""
    return rows.clone() if isinstance(rows, torch.Tensor) else rows.copy()
