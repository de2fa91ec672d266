"""Upload jobs on disk, so that an accepted job (202) survives a crash of its server.

Layout of the job directory (``Settings.job_dir``; replicas may share it)::

    records/<id>.json          one job: state, progress, error, result file name, owner
    work/<id>/                 its upload and its result
    vss-<pid>@<host>-XXXX/     a server process's temp root for synchronous requests (req-XXXX/ each)

A record is written when the job is accepted (before its work directory is moved in, so a work
directory always has a record), when it starts, every second of progress and when it ends; always
atomically (``service.atomic``). Its ``owner`` names the server process that runs it (pid, host and
the process's start time, so a reused pid is not mistaken for the owner).

``recover`` runs when a server starts: a queued or running job whose owner is gone is failed with the
reason (its upload is deleted: resubmit it), finished jobs past their TTL and work directories without
a record are deleted, and the temp roots of dead processes (or past the TTL) are removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from .adapt_jobs import pid_alive
from .atomic import TEMP_PREFIX, write_atomic

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)
RECORDS, WORK = "records", "work"
ROOT_RE = re.compile(r"vss-([0-9]+)@([A-Za-z0-9._-]+)-.+", re.ASCII)
TEMP_AGE_S = 60.0
ACTIVE = ("queued", "running")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from /proc; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": _host(), "start": _start_ticks(os.getpid())}


def owner_alive(owner: dict[str, Any] | None) -> bool:
    """Whether the process that owns a job still runs (owners on other hosts are presumed alive)."""
    if not owner or owner.get("host") != _host():
        return bool(owner)
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    start = _start_ticks(pid)
    if start is None:
        return pid == os.getpid() or pid_alive(pid)
    return start == owner.get("start")


def temp_root_prefix() -> str:
    """The prefix of this process's temp root (``tempfile.mkdtemp(prefix=...)``)."""
    return f"vss-{os.getpid()}@{_host()}-"


def record_path(parent: Path, job_id: str) -> Path:
    return parent / RECORDS / f"{job_id}.json"


def work_path(parent: Path, job_id: str) -> Path:
    return parent / WORK / job_id


def write_record(parent: Path, record: dict[str, Any]) -> None:
    write_atomic(record_path(parent, record["id"]), json.dumps(record).encode())


def read_record(parent: Path, job_id: str) -> dict[str, Any] | None:
    """A job's record, or None (unknown id, never written, or removed after its TTL)."""
    if not JOB_ID_RE.fullmatch(job_id):
        return None
    try:
        return json.loads(record_path(parent, job_id).read_text())
    except (OSError, ValueError):
        return None


def interrupted(record: dict[str, Any]) -> dict[str, Any]:
    """The record of a job whose server died: failed, with the reason."""
    was = record.get("state", "queued")
    return {**record, "state": "failed", "finished": time.time(),
            "error": {"code": "interrupted", "message": f"the server stopped (a crash or a restart) while this job "
                                                       f"was {was}; its upload is gone: submit the video again"}}


def fail_if_orphaned(parent: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Fail an active job whose owner died (record rewritten, work directory removed); else the record as is."""
    if record.get("state") not in ACTIVE or owner_alive(record.get("owner")):
        return record
    failed = interrupted(record)
    try:
        write_record(parent, failed)
    except OSError as e:  # a read-only job directory: still answer "failed", never "running" forever
        log.warning("cannot record that job %s was interrupted: %s", record.get("id"), e)
    shutil.rmtree(work_path(parent, record["id"]), ignore_errors=True)
    return failed


def recover(parent: Path, ttl_s: float, now: float | None = None) -> dict[str, int]:
    """Start-up sweep of the job directory (see the module doc); returns counts of what it did."""
    now = time.time() if now is None else now
    done = {"interrupted": 0, "expired": 0, "orphans": 0, "temp": 0}
    records = parent / RECORDS
    known: set[str] = set()
    for path in sorted(records.glob("*.json")) if records.is_dir() else []:
        job_id = path.stem
        record = read_record(parent, job_id)
        if record is None:
            continue
        known.add(job_id)
        if record.get("state") in ACTIVE:
            if fail_if_orphaned(parent, record) is not record:
                done["interrupted"] += 1
            continue
        if now - float(record.get("finished") or now) > ttl_s:
            shutil.rmtree(work_path(parent, job_id), ignore_errors=True)
            path.unlink(missing_ok=True)
            known.discard(job_id)
            done["expired"] += 1
    for path in records.glob(f"{TEMP_PREFIX}*") if records.is_dir() else []:
        done["temp"] += _remove_if_older(path, now - TEMP_AGE_S)
    work = parent / WORK
    for path in work.iterdir() if work.is_dir() else []:
        if path.name not in known:
            shutil.rmtree(path, ignore_errors=True)
            done["orphans"] += 1
    for path in parent.glob("vss-*"):
        match = ROOT_RE.fullmatch(path.name)
        # recover() runs before this process makes its own root: one named with our pid is a predecessor's
        dead = bool(match) and match[2] == _host() and (int(match[1]) == os.getpid() or not pid_alive(int(match[1])))
        try:
            old = path.stat().st_mtime < now - ttl_s
        except OSError:
            continue
        if path.is_dir() and (dead or old):
            shutil.rmtree(path, ignore_errors=True)
            done["temp"] += 1
    return done


def _remove_if_older(path: Path, cutoff: float) -> int:
    try:
        if path.stat().st_mtime < cutoff:
            path.unlink()
            return 1
    except FileNotFoundError:
        pass
    return 0
