"""Long segmentation jobs and fair sharing of the one inference engine.

``JobStore`` keeps the jobs of ``POST /v1/segment`` for videos too long to answer synchronously:
each job owns a work directory (the upload and the result) under one temp root; finished jobs are
removed, files included, ``ttl_s`` seconds after they end (swept on every access, no thread).
Jobs run on a small thread pool owned by the store.

``FairLock`` is a FIFO lock and ``LockedEngine`` an ``Engine`` proxy that holds it for each call:
every request, job and stream goes through the same lock one network call at a time, so a long
video cannot starve a live stream and concurrent callers never oversubscribe the CPU threads.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .redact import redact

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


class FairLock:
    """A FIFO mutex: waiters get the lock in arrival order (``threading.Lock`` promises no order)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._waiters: deque[threading.Event] = deque()

    def acquire(self) -> None:
        with self._mutex:
            if not self._locked and not self._waiters:
                self._locked = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        try:
            turn.wait()  # release() hands the lock over directly: _locked stays True
        except BaseException:
            with self._mutex:
                if turn.is_set():
                    self._release_locked()
                else:
                    self._waiters.remove(turn)
            raise

    def _release_locked(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._locked = False

    def release(self) -> None:
        with self._mutex:
            if not self._locked:
                raise RuntimeError("release() of an unlocked FairLock")
            self._release_locked()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockedEngine:
    """An ``Engine`` whose network calls take a shared ``FairLock`` (per call, i.e. per frame)."""

    def __init__(self, engine: Any, lock: FairLock) -> None:
        self.inner, self.lock = engine, lock
        self.version, self.meta, self.backend = engine.version, engine.meta, engine.backend

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.inner.frame_logits(frames)

    def fuse(self, current: np.ndarray, previous: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
        with self.lock:
            return self.inner.fuse(current, previous, flow)

    def __getattr__(self, name: str) -> Any:  # input_size, num_classes, ... of the wrapped engine
        return getattr(self.inner, name)


@dataclass
class Job:
    """One long segmentation; ``done``/``total`` count segmented frames."""

    id: str
    workdir: Path
    total: int
    fmt: str
    state: str = QUEUED
    done: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: dict[str, str] | None = None
    result: Path | None = None
    media_type: str | None = None
    filename: str | None = None
    summary: dict[str, Any] | None = None

    def eta_s(self, now: float) -> float | None:
        """Seconds left at the rate so far; None before the first frame."""
        if self.state == DONE:
            return 0.0
        if self.state != RUNNING or not self.started or self.done <= 0:
            return None
        rate = self.done / max(now - self.started, 1e-6)
        return max(self.total - self.done, 0) / rate

    def public(self, now: float | None = None) -> dict[str, Any]:
        """The JSON body of ``GET /v1/jobs/{id}``."""
        now = time.time() if now is None else now
        eta = self.eta_s(now)
        return {
            "id": self.id, "state": self.state, "format": self.fmt,
            "frames_done": self.done, "frames_total": self.total,
            "progress": round(min(self.done / self.total, 1.0), 4) if self.total else 0.0,
            "eta_s": None if eta is None else round(eta, 2),
            "created": self.created, "started": self.started, "finished": self.finished,
            "error": self.error, "summary": self.summary,
        }


class JobStoreFull(RuntimeError):
    """Too many jobs are queued or running; the caller should retry later."""


class JobCancelled(RuntimeError):
    """The store is closing: a running job stops at its next frame."""


class JobStore:
    """Jobs and per-request work directories under one temp root, with TTL cleanup and a thread pool."""

    def __init__(self, parent: str | Path | None = None, ttl_s: float = 3600.0, workers: int = 1,
                 max_pending: int = 16) -> None:
        """Files go to a private ``vss-*`` directory under ``parent`` (the system temp dir if None);
        such directories left behind by dead processes are removed once older than the TTL."""
        self.parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        self.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s, self.max_pending = ttl_s, max_pending
        self._remove_stale_roots()
        self.root = Path(tempfile.mkdtemp(dir=self.parent, prefix="vss-"))
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vss-job")

    def _remove_stale_roots(self) -> None:
        cutoff = time.time() - self.ttl_s
        for old in self.parent.glob("vss-*"):
            try:
                if old.is_dir() and old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                continue  # another process removed it first

    def workdir(self) -> Path:
        """A fresh private directory for one request (the caller removes it, or a job owns it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix="req-"))

    def submit(self, workdir: Path, total: int, fmt: str, run: Callable[[Job], None]) -> Job:
        """Queue ``run(job)`` on the pool; it reports through ``progress``/``finish``/``fail``.

        Raises ``JobStoreFull`` when ``max_pending`` jobs are already queued or running.
        """
        self.sweep()
        with self._lock:
            pending = sum(j.state in (QUEUED, RUNNING) for j in self._jobs.values())
            if pending >= self.max_pending:
                raise JobStoreFull(f"{pending} jobs are already queued or running; retry later")
            job = Job(id=uuid.uuid4().hex, workdir=workdir, total=total, fmt=fmt)
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, run)
        return job

    def _run(self, job: Job, run: Callable[[Job], None]) -> None:
        job.state, job.started = RUNNING, time.time()
        try:
            run(job)
        except Exception as e:  # noqa: BLE001 - a job's failure is recorded, never raised into the pool
            if job.state != FAILED:
                self.fail(job, "internal_error", f"{type(e).__name__}: {e}")
        else:
            if job.state == RUNNING:
                self.fail(job, "internal_error", "the job ended without a result")

    def progress(self, job: Job, done: int) -> None:
        """Record progress; raises ``JobCancelled`` once the store is closing."""
        if self._closing.is_set():
            raise JobCancelled("the server is shutting down")
        job.done = done

    def finish(self, job: Job, result: Path, media_type: str, filename: str,
               summary: dict[str, Any] | None = None) -> None:
        job.result, job.media_type, job.filename, job.summary = result, media_type, filename, summary
        job.done = max(job.done, job.total)
        job.finished, job.state = time.time(), DONE

    def fail(self, job: Job, code: str, message: str) -> None:
        job.error = {"code": code, "message": redact(message)}  # answered to clients: no server paths
        job.finished, job.state = time.time(), FAILED
        shutil.rmtree(job.workdir, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        self.sweep()
        with self._lock:
            return self._jobs.get(job_id)

    def sweep(self, now: float | None = None) -> int:
        """Forget finished jobs older than the TTL and delete their files; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self._jobs.values() if j.finished is not None and now - j.finished > self.ttl_s]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            shutil.rmtree(job.workdir, ignore_errors=True)
        return len(old)

    def close(self) -> None:
        """Cancel queued jobs, stop the running one at its next frame, delete everything under the root."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)



@dataclass
class DataPlane:
    """What the upload and stream routes share in one app: the job store and the engine lock."""

    jobs: JobStore
    engine_lock: FairLock

    def close(self) -> None:
        self.jobs.close()


def data_plane(app: Any) -> DataPlane:
    """The app's ``DataPlane``, created on first use from ``app.state.settings``.

    Called from async route code only (the event-loop thread), so creation needs no lock.
    """
    plane = getattr(app.state, "data_plane", None)
    if plane is None:
        settings = app.state.settings
        plane = DataPlane(JobStore(settings.job_dir, settings.job_ttl_s), FairLock())
        app.state.data_plane = plane
    return plane
