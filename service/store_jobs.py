"""Adaptation jobs on an object store (``VSS_BUFFER_DIR=s3://bucket/prefix``: jobs under ``<prefix>/jobs``).

The job state machine is ``service.adapt_jobs.AdaptJobStore``'s, unchanged; only its plumbing moves:

    <id>.json                  one job record (a plain PUT replaces it atomically)
    worker-<host>-<pid>.json   a worker's heartbeat
    LOCK                       the lease that serialises read-modify-writes of job records

Why a lease lock and not a queue: the fleet already depends on one S3 store and needs no second
service; jobs are rare (one at a time) and every critical section is a handful of small requests.
The lease is taken by a conditional write: ``If-None-Match: *`` creates ``LOCK``; a lock older than
``LOCK_TTL_S`` (its holder died) is taken over with ``If-Match`` on the ETag it was read with, so two
takers never both win. ``LOCK_TTL_S`` is far longer than any critical section (a few requests, each
bounded by the client timeout). Releasing deletes the lock.

Which worker runs a job is decided under that lock by ``claim`` (the job records ``worker`` and a
``heartbeat``): the job's own lease. The worker renews it with every heartbeat; ``reap`` (run by
servers and workers) fails a running job whose heartbeat is older than ``adapt_heartbeat_timeout_s``
with the reason ``worker_lost``, and a worker whose job is no longer active stops before publishing.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .adapt_jobs import AUTO_STATE, FINAL_STATES, JOB_ID_RE, AdaptJobStore, JobNotFound, _now
from .storage import ObjectNotFound, ObjectStore, PreconditionFailed, StoreUnavailable, is_store_url, open_store

LOCK_KEY = "LOCK"
LOCK_TTL_S = 60.0
LOCK_WAIT_S = 30.0


class StoreLease:
    """A mutual-exclusion lease on one object of ``store`` (see the module docstring)."""

    def __init__(self, store: ObjectStore, key: str = LOCK_KEY, ttl_s: float = LOCK_TTL_S,
                 wait_s: float = LOCK_WAIT_S) -> None:
        self.store, self.key, self.ttl_s, self.wait_s = store, key, ttl_s, wait_s

    def acquire(self) -> str:
        """Take the lease; returns its token. ``StoreUnavailable`` if it stays held for ``wait_s``."""
        token = uuid.uuid4().hex
        body = json.dumps({"token": token, "at": time.time()}).encode()
        deadline, pause = time.monotonic() + self.wait_s, 0.01
        while True:
            try:
                self.store.put(self.key, body, create_only=True)
                return token
            except PreconditionFailed:
                pass
            try:
                held = self.store.get(self.key)
                age = time.time() - float(json.loads(held.data).get("at", 0.0))
                if age > self.ttl_s:  # the holder died: take over that exact lease, or lose to another taker
                    self.store.put(self.key, body, if_match=held.etag)
                    return token
            except (ObjectNotFound, PreconditionFailed, ValueError):
                pass  # released, taken over by someone else, or being rewritten: try again
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"lease {self.key} in {self.store.url} stayed held for {self.wait_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def release(self, token: str) -> None:
        try:
            held = json.loads(self.store.get(self.key).data)
        except (ObjectNotFound, ValueError):
            return
        if held.get("token") == token:  # never delete a lease another process took over
            self.store.delete(self.key)

    @contextmanager
    def held(self) -> Iterator[None]:
        token = self.acquire()
        try:
            yield
        finally:
            self.release(token)


class StoreJobStore(AdaptJobStore):
    """``AdaptJobStore`` whose records live in an ``ObjectStore`` (any number of hosts)."""

    def __init__(self, store: ObjectStore, keep: int = 100) -> None:
        self.store, self.keep = store, keep
        self.root = store.url  # type: ignore[assignment]  # for log lines only
        self._lease = StoreLease(store)

    def ensure(self) -> None:
        """Nothing to create on an object store."""

    def sweep(self, max_age_s: float = 60.0) -> int:
        """Nothing to sweep: every put to the store is atomic."""
        return 0

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lease.held():
            yield

    @staticmethod
    def _key(job_id: str) -> str:
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise JobNotFound(f"no adaptation job {job_id!r}")
        return f"{job_id}.json"

    def _write(self, job: dict[str, Any]) -> dict[str, Any]:
        job["updated"] = _now()
        self.store.put(self._key(job["id"]), json.dumps(job, indent=1).encode())
        return job

    def _all(self) -> list[dict[str, Any]]:
        jobs = []
        for obj in self.store.list():
            stem = obj.key.removesuffix(".json")
            if obj.key.endswith(".json") and JOB_ID_RE.fullmatch(stem):
                try:
                    jobs.append(json.loads(self.store.get(obj.key).data))
                except (ObjectNotFound, ValueError):
                    continue  # pruned while listing
        return sorted(jobs, key=lambda j: j.get("created", 0.0))

    def get(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.store.get(self._key(job_id)).data)
        except ObjectNotFound as e:
            raise JobNotFound(f"no adaptation job {job_id!r}") from e

    def cancel_requested(self, job_id: str) -> bool:
        """Also True once the job is no longer active: its lease was lost (reaped) or it was removed."""
        try:
            job = self.get(job_id)
        except (JobNotFound, ValueError):
            return True
        return bool(job.get("cancel_requested")) or job["state"] in FINAL_STATES

    def _prune(self) -> None:
        finished = [j for j in self._all() if j["state"] in FINAL_STATES]
        for job in finished[:max(len(finished) - self.keep, 0)]:
            self.store.delete(self._key(job["id"]))

    def write_auto_state(self, state: dict[str, Any]) -> None:
        self.store.put(AUTO_STATE, json.dumps(state).encode())

    def read_auto_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.store.get(AUTO_STATE).data)
        except (ObjectNotFound, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def beat(self, worker: dict[str, Any]) -> None:
        self.store.put(_worker_key(str(worker["host"]), int(worker["pid"])),
                       json.dumps({**worker, "heartbeat": _now()}).encode())

    def forget_worker(self, pid: int, host: str) -> None:
        self.store.delete(_worker_key(host, pid))

    def workers(self, max_age_s: float) -> list[dict[str, Any]]:
        now, out = time.time(), []
        for obj in self.store.list("worker-"):
            try:
                info = json.loads(self.store.get(obj.key).data)
            except (ObjectNotFound, ValueError):
                continue
            age = now - float(info.get("heartbeat", 0.0))
            if age <= max_age_s:
                out.append(info)
            elif age > 10 * max_age_s:
                self.store.delete(obj.key)
        return out


def _worker_key(host: str, pid: int) -> str:
    return f"worker-{re.sub(r'[^A-Za-z0-9.-]', '_', host)}-{int(pid)}.json"


def open_job_store(location: str | Path, keep: int = 100) -> AdaptJobStore:
    """Job records in a directory (``AdaptJobStore``) or under an ``s3://`` URL (``StoreJobStore``)."""
    if is_store_url(location):
        return StoreJobStore(open_store(location), keep)
    return AdaptJobStore(location, keep)
