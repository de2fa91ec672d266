"""Upload job records on disk and the start-up sweeps of every temp name (issue 10, build 4)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from service import job_records as records
from service.adapt_jobs import AdaptJobStore
from service.buffer import ClipBuffer
from service.segment_jobs import JobStore
from tests.waiting import wait_until


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def backdate(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_replicas_sharing_the_job_directory_answer_each_others_jobs(tmp_path: Path) -> None:
    a, b = JobStore(tmp_path), JobStore(tmp_path)
    release = threading.Event()

    def run(job) -> None:
        a.progress(job, 1)
        release.wait(30)
        a.finish(job, job.workdir / "result.json", "application/json", "r.json")

    job = a.submit(a.workdir(), 2, "json", run)
    assert b.get(job.id).state in ("queued", "running")
    release.set()
    wait_until(lambda: b.get(job.id).state == "done", 30, "the job to be done on disk")
    assert b.get(job.id).result == tmp_path / "work" / job.id / "result.json"
    assert b.get("0" * 32) is None and b.get("../records/x") is None
    a.close()
    b.close()


def test_recover_fails_orphaned_jobs_and_sweeps_temp_names(tmp_path: Path) -> None:
    host = records.this_process()["host"]
    gone = {"pid": dead_pid(), "host": host, "start": "1"}
    (tmp_path / "records").mkdir()
    (tmp_path / "work").mkdir()
    for job_id, state in (("a" * 32, "running"), ("b" * 32, "queued"), ("c" * 32, "done")):
        records.write_record(tmp_path, {"id": job_id, "state": state, "format": "zip", "owner": gone,
                                        "finished": time.time() if state == "done" else None})
        (tmp_path / "work" / job_id).mkdir()
        (tmp_path / "work" / job_id / "upload.bin").write_bytes(b"x")
    (tmp_path / "work" / ("d" * 32)).mkdir()  # no record
    root = tmp_path / f"vss-{gone['pid']}@{host}-abc"
    (root / "req-1").mkdir(parents=True)
    live_root = tmp_path / f"vss-{os.getppid()}@{host}-abc"  # a live process's (our parent's)
    live_root.mkdir()
    temp = tmp_path / "records" / ".tmp-x.json.123"
    temp.write_text("{")
    backdate(temp, 120)
    done = records.recover(tmp_path, ttl_s=3600)
    assert done == {"interrupted": 2, "expired": 0, "orphans": 1, "temp": 2}
    for job_id, was in (("a" * 32, "running"), ("b" * 32, "queued")):
        record = json.loads((tmp_path / "records" / f"{job_id}.json").read_text())
        assert record["state"] == "failed" and record["error"]["code"] == "interrupted"
        assert f"was {was}" in record["error"]["message"]
        assert not (tmp_path / "work" / job_id).exists()
    assert (tmp_path / "work" / ("c" * 32) / "upload.bin").exists()  # finished: kept until its TTL
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["c" * 32]
    assert not root.exists() and live_root.exists() and not temp.exists()
    assert records.recover(tmp_path, ttl_s=0.0, now=time.time() + 1)["expired"] == 3


def test_a_reused_pid_is_not_the_owner() -> None:
    me = records.this_process()
    assert records.owner_alive(me)
    assert not records.owner_alive({**me, "start": "0"})  # same pid, another process (a container restart)
    assert not records.owner_alive({**me, "pid": dead_pid()})
    assert records.owner_alive({**me, "host": "another-host"})  # cannot tell: presumed alive


def test_buffer_and_adapt_job_directory_sweep_temp_files(tmp_path: Path) -> None:
    buffer = ClipBuffer(tmp_path / "buffer")
    buffer.root.mkdir()
    jobs = AdaptJobStore(tmp_path / "adapt")
    jobs.root.mkdir()
    old, fresh = buffer.root / ".tmp-1.npz.x", buffer.root / ".tmp-2.npz.y"
    job_old = jobs.root / ".tmp-j.json.z"
    for path in (old, fresh, job_old):
        path.write_bytes(b"partial")
    backdate(old, 120)
    backdate(job_old, 120)
    assert buffer.sweep() == 1 and jobs.sweep() == 1
    assert not old.exists() and fresh.exists() and not job_old.exists()
