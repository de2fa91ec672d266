"""Adaptation jobs as files, shared by server processes and adaptation workers, and the workers' heartbeats.

Layout of the job directory (``Settings.job_root()``, by default ``<buffer_dir>/jobs``)::

    <id>.json              one job: request, state, progress, losses, gate report, version, error
    worker-<host>-<pid>.json   a worker's heartbeat (written every ``adapt_heartbeat_s``)
    .lock                  flock(2) lock held for every read-modify-write of a job (``models.atomic.locked``)

Every job file is replaced atomically (temp file + ``os.replace``), so readers never see half of
one. Mutations (create, claim, progress, cancel, finish) take the directory lock, so a server
setting ``cancel_requested`` and a worker writing progress never lose each other's update.

States: ``queued`` -> ``running`` -> ``gating`` -> ``published`` | ``rejected``; any active state
can end ``failed`` or ``cancelled``. At most one job is active (queued, running or gating) at a time.

A running job whose worker has been silent for ``adapt_heartbeat_timeout_s``, or whose worker
process is gone from this host, is failed by ``reap`` (servers call it when jobs are read;
``service.worker_supervisor`` also fails the job of a spawned worker the moment it dies).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import TEMP_PREFIX, locked, write_atomic
from .redact import redact

log = logging.getLogger(__name__)

QUEUED, RUNNING, GATING = "queued", "running", "gating"
PUBLISHED, REJECTED, FAILED, CANCELLED = "published", "rejected", "failed", "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING, GATING)
FINAL_STATES = (PUBLISHED, REJECTED, FAILED, CANCELLED)
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_LOSSES = 200  # loss log entries kept per job
AUTO_STATE = "auto.json"  # the worker's auto-policy state (service/auto_rounds.py)


class JobNotFound(LookupError):
    """No job file with this id."""


class JobConflict(RuntimeError):
    """Another job is queued or running (one job at a time)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"adaptation job {job['id']} is {job['state']}; one job runs at a time")
        self.job = job


def _now() -> float:
    return round(time.time(), 3)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AdaptJobStore:
    """Job files under ``root``; every method is safe to call from several processes at once."""

    def __init__(self, root: str | Path, keep: int = 100) -> None:
        self.root = Path(root)
        self.keep = keep

    # --- plumbing ------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The directory lock around a read-modify-write (a store-backed subclass holds a lease instead)."""
        with locked(self.root):
            yield

    def ensure(self) -> None:
        """Create the job directory."""
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise JobNotFound(f"no adaptation job {job_id!r}")
        return self.root / f"{job_id}.json"

    def _write(self, job: dict[str, Any]) -> dict[str, Any]:
        job["updated"] = _now()
        write_atomic(self._path(job["id"]), json.dumps(job, indent=1).encode())
        return job

    def _all(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        jobs = []
        for path in self.root.glob("*.json"):
            if not JOB_ID_RE.fullmatch(path.stem):
                continue
            try:
                jobs.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # removed by pruning while listing
        return sorted(jobs, key=lambda j: j.get("created", 0.0))

    # --- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._path(job_id).read_text())
        except FileNotFoundError as e:
            raise JobNotFound(f"no adaptation job {job_id!r}") from e

    def list(self) -> list[dict[str, Any]]:
        """All jobs, newest first."""
        return self._all()[::-1]

    def active(self) -> dict[str, Any] | None:
        """The queued, running or gating job, if any."""
        return next((j for j in self._all() if j["state"] in ACTIVE_STATES), None)

    def has_queued(self) -> bool:
        return any(j["state"] == QUEUED for j in self._all())

    def last_created(self) -> float | None:
        jobs = self._all()
        return jobs[-1]["created"] if jobs else None

    def cancel_requested(self, job_id: str) -> bool:
        """Lock-free check for the worker's training loop."""
        try:
            return bool(self.get(job_id).get("cancel_requested"))
        except (JobNotFound, ValueError):
            return True  # the job file is gone: nobody wants the result any more

    # --- transitions ---------------------------------------------------------------------------
    def create(self, request: dict[str, Any], trigger: str = "api") -> dict[str, Any]:
        """Queue a job for ``request`` (method, steps, lr, ...); ``JobConflict`` if one is active."""
        with self._locked():
            active = self.active()
            if active is not None:
                raise JobConflict(active)
            now = _now()
            job = {"id": uuid.uuid4().hex, "state": QUEUED, "trigger": trigger, "request": request,
                   "created": now, "started": None, "finished": None, "updated": now,
                   "stage": None, "step": 0, "steps": int(request.get("steps", 0)), "progress": 0.0,
                   "losses": [], "parent": None, "version": None, "activated": False, "gate": None,
                   "clips": None, "error": None, "cancel_requested": False, "worker": None, "heartbeat": None}
            self._write(job)
            self._prune()
            return job

    def claim(self, worker: dict[str, Any]) -> dict[str, Any] | None:
        """Give the oldest queued job to ``worker`` ({"pid", "host"}) and mark it running."""
        with self._locked():
            job = next((j for j in self._all() if j["state"] == QUEUED), None)
            if job is None:
                return None
            now = _now()
            job.update(state=RUNNING, started=now, heartbeat=now, worker=worker, stage="loading")
            return self._write(job)

    def update(self, job_id: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``fn(job)`` under the lock and write the result (no-op on a finished job)."""
        with self._locked():
            job = self.get(job_id)
            if job["state"] in FINAL_STATES:
                return job
            fn(job)
            return self._write(job)

    def set(self, job_id: str, **fields: Any) -> dict[str, Any]:
        return self.update(job_id, lambda job: job.update(fields))

    def log_losses(self, job_id: str, step: int, logs: dict[str, float]) -> dict[str, Any]:
        """Record one training log line and the progress it implies."""
        entry = {"step": int(step), **{k: round(float(v), 5) for k, v in logs.items() if k != "step"}}

        def apply(job: dict[str, Any]) -> None:
            job["losses"] = (job["losses"] + [entry])[-MAX_LOSSES:]
            job["step"] = int(step)
            job["progress"] = round(min(step / max(job["steps"], 1), 1.0), 4)
            job["heartbeat"] = _now()

        return self.update(job_id, apply)

    def finish(self, job_id: str, state: str, error: tuple[str, str] | None = None, **fields: Any) -> dict[str, Any]:
        """End a job in a final ``state``; ``error`` is (code, message) for failures."""
        if state not in FINAL_STATES:
            raise ValueError(f"{state!r} is not a final job state")

        def apply(job: dict[str, Any]) -> None:
            job.update(fields)
            job.update(state=state, finished=_now(), stage=None)
            if error is not None:
                job["error"] = {"code": error[0], "message": redact(error[1])}  # answered to clients: no paths
            if state == PUBLISHED:
                job["progress"] = 1.0

        return self.update(job_id, apply)

    def request_cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job now; ask the worker to stop a running one (it ends ``cancelled``)."""
        with self._locked():
            job = self.get(job_id)
            if job["state"] == QUEUED:
                job.update(state=CANCELLED, finished=_now(), cancel_requested=True)
                return self._write(job)
            if job["state"] in ACTIVE_STATES:
                job["cancel_requested"] = True
                return self._write(job)
            return job

    def fail_claimed(self, pid: int, host: str, code: str, message: str) -> list[str]:
        """Fail the active jobs held by worker ``pid`` on ``host`` (it died); returns their ids."""
        failed = []
        for job in self._all():
            worker = job.get("worker") or {}
            if job["state"] in (RUNNING, GATING) and worker.get("pid") == pid and worker.get("host") == host:
                self.finish(job["id"], FAILED, (code, message))
                failed.append(job["id"])
        return failed

    def reap(self, timeout_s: float, now: float | None = None) -> list[str]:
        """Fail running jobs whose worker is gone: silent for ``timeout_s``, or a dead pid on this host."""
        now = time.time() if now is None else now
        host = socket.gethostname()
        failed = []
        for job in self._all():
            if job["state"] not in (RUNNING, GATING):
                continue
            worker = job.get("worker") or {}
            silent = now - float(job.get("heartbeat") or job.get("started") or now)
            dead = worker.get("host") == host and isinstance(worker.get("pid"), int) and not pid_alive(worker["pid"])
            if silent > timeout_s or dead:
                why = "exited" if dead else f"sent no heartbeat for {silent:.0f} s"
                log.warning("adaptation job %s: its worker (pid %s on %s) %s", job["id"], worker.get("pid"),
                            worker.get("host"), why)
                self.finish(job["id"], FAILED, ("worker_lost", f"the adaptation worker {why}; the job was abandoned"))
                failed.append(job["id"])
        return failed

    def sweep(self, max_age_s: float = 60.0) -> int:
        """Remove temp files of writers that died (``service.atomic`` names them ``.tmp-*``); at start."""
        removed, cutoff = 0, time.time() - max_age_s
        for path in self.root.glob(f"{TEMP_PREFIX}*") if self.root.is_dir() else []:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _prune(self) -> None:
        finished = [j for j in self._all() if j["state"] in FINAL_STATES]
        for job in finished[:max(len(finished) - self.keep, 0)]:
            self._path(job["id"]).unlink(missing_ok=True)

    # --- the auto policy's state (service/auto_rounds.py) ----------------------------------------
    def write_auto_state(self, state: dict[str, Any]) -> None:
        """Replace ``auto.json``: what the worker's auto policy decided last (servers show it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / AUTO_STATE, json.dumps(state).encode())

    def read_auto_state(self) -> dict[str, Any] | None:
        """The auto policy's state, or None when no worker ran it (or the file is unreadable)."""
        try:
            state = json.loads((self.root / AUTO_STATE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    # --- worker heartbeats ---------------------------------------------------------------------
    def beat(self, worker: dict[str, Any]) -> None:
        """Record that a worker is alive (``worker``: pid, host, started, job, ...)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"worker-{re.sub(r'[^A-Za-z0-9.-]', '_', str(worker['host']))}-{int(worker['pid'])}.json"
        write_atomic(self.root / name, json.dumps({**worker, "heartbeat": _now()}).encode())

    def forget_worker(self, pid: int, host: str) -> None:
        (self.root / f"worker-{re.sub(r'[^A-Za-z0-9.-]', '_', host)}-{pid}.json").unlink(missing_ok=True)

    def workers(self, max_age_s: float) -> list[dict[str, Any]]:
        """Workers that beat within ``max_age_s``; older heartbeat files are removed."""
        now, out = time.time(), []
        for path in self.root.glob("worker-*.json") if self.root.is_dir() else []:
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if now - float(info.get("heartbeat", 0.0)) <= max_age_s:
                out.append(info)
            elif now - float(info.get("heartbeat", 0.0)) > 10 * max_age_s:
                path.unlink(missing_ok=True)
        return out
