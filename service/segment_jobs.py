"""Long segmentation jobs and fair sharing of the one inference engine.

``JobStore`` keeps the jobs of ``POST /v1/segment`` for videos too long to answer synchronously:
each job owns a work directory (the upload and the result) under one temp root; finished jobs are
removed, files included, ``ttl_s`` seconds after they end (swept on every access, no thread).
Jobs run on a small thread pool owned by the store.

``FairLock`` is a FIFO lock and ``LockedEngine`` an ``Engine`` proxy that holds it for each call:
every request, job and stream goes through the same lock one network call at a time, so a long
video cannot starve a live stream and concurrent callers never oversubscribe the CPU threads.
With ``batch_max`` > 1 the per-frame network calls go through the app's ``Batcher`` instead, which
runs the frames of concurrent callers as one batch under the same lock (``service.batcher``).
"""

from __future__ import annotations

import functools
import logging
import os
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

from . import crashpoints
from . import job_records as records
from .atomic import storage_problem
from .batcher import Batcher
from .redact import redact

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
PERSIST_EVERY_S = 1.0  # how often a running job's progress is written to its record


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
    """An ``Engine`` whose network calls take a shared ``FairLock`` (per call, i.e. per frame); with a
    ``batcher`` (built on the same lock) the per-frame network call goes through it."""

    def __init__(self, engine: Any, lock: FairLock, batcher: Batcher | None = None) -> None:
        self.inner, self.lock, self.batcher = engine, lock, batcher
        self.version, self.meta, self.backend = engine.version, engine.meta, engine.backend

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        if self.batcher is not None:
            return self.batcher.frame_logits(self.inner, frames)
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
    """Upload jobs and per-request work directories under ``parent``, with TTL cleanup and a thread pool.

    Jobs are recorded on disk (``service.job_records``): a job accepted with 202 is never forgotten by a
    crash; a restarted server answers it as failed with the reason (or done, with its result, if it
    finished first). Nothing touches the disk before ``start`` (called at startup and by every method
    that needs it), so a read-only job directory makes uploads fail with 503, not the server.
    """

    def __init__(self, parent: str | Path | None = None, ttl_s: float = 3600.0, workers: int = 1,
                 max_pending: int = 16) -> None:
        """Files go under ``parent`` (``vss-jobs`` in the system temp dir if None)."""
        self.parent = Path(parent) if parent is not None else Path(tempfile.gettempdir()) / "vss-jobs"
        self.ttl_s, self.max_pending = ttl_s, max_pending
        self.root: Path | None = None  # this process's temp root for request work directories (made lazily)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._started = False
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vss-job")
        self._persisted: dict[str, float] = {}  # job id -> when its progress was last written

    def start(self) -> None:
        """Create the directories and recover what a crashed predecessor left (once; raises ``OSError``)."""
        with self._start_lock:
            if self._started:
                return
            for sub in (records.RECORDS, records.WORK):
                (self.parent / sub).mkdir(parents=True, exist_ok=True)
            done = records.recover(self.parent, self.ttl_s)
            if any(done.values()):
                log.info("job store %s: recovered after a restart: %s", self.parent, done)
            self._started = True

    def workdir(self) -> Path:
        """A fresh private directory for one request (the caller removes it, or a job owns it), under this
        process's temp root ``vss-<pid>@<host>-*``."""
        self.start()
        with self._start_lock:
            if self.root is None or not self.root.is_dir():
                self.root = Path(tempfile.mkdtemp(dir=self.parent, prefix=records.temp_root_prefix()))
            root = self.root
        return Path(tempfile.mkdtemp(dir=root, prefix="req-"))

    def submit(self, workdir: Path, total: int, fmt: str, run: Callable[[Job], None]) -> Job:
        """Queue ``run(job)`` on the pool; it reports through ``progress``/``finish``/``fail``.

        The job is recorded on disk and ``workdir`` moves to the job's own work directory
        (``job.workdir``) before this returns. Raises ``JobStoreFull`` when ``max_pending`` jobs are
        already queued or running, ``OSError`` when the job cannot be recorded (nothing is kept then).
        """
        self.start()
        self.sweep()
        with self._lock:
            pending = sum(j.state in (QUEUED, RUNNING) for j in self._jobs.values())
            if pending >= self.max_pending:
                raise JobStoreFull(f"{pending} jobs are already queued or running; retry later")
            job_id = uuid.uuid4().hex
            job = Job(id=job_id, workdir=records.work_path(self.parent, job_id), total=total, fmt=fmt)
            self._persist(job)  # the record first: a work directory without one is swept as an orphan
            try:
                os.rename(workdir, job.workdir)
            except OSError:
                records.record_path(self.parent, job_id).unlink(missing_ok=True)
                raise
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, run)
        return job

    def _persist(self, job: Job, state: str | None = None) -> None:
        """Write the job's record (with ``state`` instead of the job's own, for a transition about to happen)."""
        record = {**job.public(), "total": job.total, "done": job.done, "media_type": job.media_type,
                  "filename": job.filename, "result": job.result.name if job.result else None,
                  "owner": self._owner}
        if state is not None:
            record["state"] = state
        records.write_record(self.parent, record)
        self._persisted[job.id] = time.monotonic()

    @functools.cached_property
    def _owner(self) -> dict[str, Any]:
        return records.this_process()

    def _persist_quietly(self, job: Job, state: str | None = None) -> None:
        try:
            self._persist(job, state)
        except OSError as e:  # a full disk must not also fail the job's bookkeeping
            log.warning("cannot record job %s: %s", job.id, e)

    def _run(self, job: Job, run: Callable[[Job], None]) -> None:
        job.state, job.started = RUNNING, time.time()
        self._persist_quietly(job)
        try:
            crashpoints.reached("upload_job_start")
            run(job)
        except Exception as e:  # noqa: BLE001 - a job's failure is recorded, never raised into the pool
            if job.state != FAILED:
                problem = storage_problem(e)
                if problem is not None:
                    self.fail(job, problem[1], problem[2])
                elif isinstance(e, JobCancelled):
                    self.fail(job, "interrupted", "the server is shutting down: the job was stopped; submit "
                                                  "the video again")
                else:
                    log.error("upload job %s failed", job.id, exc_info=e)
                    self.fail(job, "internal_error", f"the job failed ({type(e).__name__})")
        else:
            if job.state == RUNNING:
                self.fail(job, "internal_error", "the job ended without a result")

    def progress(self, job: Job, done: int) -> None:
        """Record progress (on disk at most once a second); raises ``JobCancelled`` once the store is closing."""
        if self._closing.is_set():
            raise JobCancelled("the server is shutting down")
        job.done = done
        if time.monotonic() - self._persisted.get(job.id, 0.0) >= PERSIST_EVERY_S:
            self._persist_quietly(job)

    def finish(self, job: Job, result: Path, media_type: str, filename: str,
               summary: dict[str, Any] | None = None) -> None:
        job.result, job.media_type, job.filename, job.summary = result, media_type, filename, summary
        job.done = max(job.done, job.total)
        job.finished = time.time()
        self._persist_quietly(job, DONE)  # on disk first: a sweep that sees the new state also sees the record
        job.state = DONE

    def fail(self, job: Job, code: str, message: str) -> None:
        job.error = {"code": code, "message": redact(message)}  # answered to clients: no server paths
        job.finished = time.time()
        shutil.rmtree(job.workdir, ignore_errors=True)
        self._persist_quietly(job, FAILED)
        job.state = FAILED

    def get(self, job_id: str) -> Job | None:
        """A job of this process, or one recorded on disk (another replica's, or a predecessor's: an
        active job whose server died is failed with the reason)."""
        self.sweep()
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            return job
        record = records.read_record(self.parent, job_id)
        if record is None:
            return None
        return _from_record(records.fail_if_orphaned(self.parent, record), self.parent)

    def sweep(self, now: float | None = None) -> int:
        """Forget finished jobs older than the TTL and delete their files; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self._jobs.values() if j.finished is not None and now - j.finished > self.ttl_s]
            for job in old:
                del self._jobs[job.id]
                self._persisted.pop(job.id, None)
        for job in old:
            shutil.rmtree(job.workdir, ignore_errors=True)
            records.record_path(self.parent, job.id).unlink(missing_ok=True)
        return len(old)

    def close(self) -> None:
        """Cancel queued jobs, stop the running one at its next frame (both end failed, with the reason),
        delete this process's temp root."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            unfinished = [j for j in self._jobs.values() if j.state in (QUEUED, RUNNING)]
        for job in unfinished:
            self.fail(job, "interrupted", "the server shut down before this job ran; submit the video again")
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _from_record(record: dict[str, Any], parent: Path) -> Job:
    workdir = records.work_path(parent, record["id"])
    return Job(id=record["id"], workdir=workdir, total=int(record.get("total") or 0), fmt=str(record.get("format")),
               state=record.get("state", FAILED), done=int(record.get("done") or 0),
               created=float(record.get("created") or 0.0), started=record.get("started"),
               finished=record.get("finished"), error=record.get("error"),
               result=workdir / record["result"] if record.get("result") else None,
               media_type=record.get("media_type"), filename=record.get("filename"), summary=record.get("summary"))


@dataclass
class DataPlane:
    """What the upload and stream routes share in one app: the job store, the engine lock and the batcher
    (built by ``service.components.build_components``)."""

    jobs: JobStore
    engine_lock: FairLock
    batcher: Batcher

    def close(self) -> None:
        self.jobs.close()
