"""kill -9 at each stage of an upload job and of an adaptation job (issue 10, defects 8 and 9): a job that
was accepted (202) is never 404 after a restart (it is resumed, or failed with the reason), and every
temp name the dead process created is swept when the server starts again.

Real `vss serve` processes on loopback (and a real worker process); each stage is reached through a
named crashpoint (``service.crashpoints``), where the process waits to be killed: no sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.buffer import ClipBuffer
from service.registry import ModelRegistry
from service.video_io import VideoWriter
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
VSS = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"]
WORKER = [sys.executable, "-c", """
from adaptation.gate import GateThresholds
from service.settings import Settings
from service.worker import Worker
lenient = GateThresholds(vanish_share=1.0, min_entropy_ratio=0.0, max_class_tv=1.0, tc_tolerance=100.0,
                         min_agreement=0.0)
Worker(Settings(), thresholds=lenient).run(once=True)
"""]
START_TIMEOUT = 90.0  # a process importing torch on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child in its own session, so that kill -9 takes its children (decoder, worker) with it."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill9(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class World:
    """The directories a server and a worker share; ``serve()`` / ``work()`` start processes on them."""

    def __init__(self, root: Path, tiny_checkpoint: Path) -> None:
        self.root = root
        self.models = ModelRegistry(root / "models")
        self.models.import_dir(tiny_checkpoint, activate=True)
        self.jobs = root / "jobs"
        self.marker = root / "reached"
        self.procs: list[Process] = []

    def env(self, crashpoint: str | None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VSS_")}
        env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VSS_INTRA_OP_THREADS": "1",
                    "VSS_DEMO_MODEL": "none", "VSS_MODEL_DIR": str(self.models.root), "VSS_JOB_DIR": str(self.jobs),
                    "VSS_BUFFER_DIR": str(self.root / "buffer"), "VSS_CACHE_DIR": str(self.root / "cache"),
                    "VSS_FLOW": "none", "VSS_WARMUP": "false", "VSS_WORKER": "external", "VSS_LOG_JSON": "false",
                    "VSS_JOB_FRAME_THRESHOLD": "1", "VSS_ADAPT_MIN_CLIPS": "1", "VSS_DEVICE": "cpu",
                    "VSS_ADAPT_DEVICE": "cpu", "VSS_BUFFER_HELDOUT_FRACTION": "0.5", **extra})
        if crashpoint:
            self.marker.unlink(missing_ok=True)
            env.update({"VSS_CRASHPOINT": crashpoint, "VSS_CRASHPOINT_FILE": str(self.marker)})
        return env

    def serve(self, crashpoint: str | None = None) -> tuple[Process, str]:
        port = free_port()
        proc = Process([*VSS, "serve", "--host", "127.0.0.1", "--port", str(port)], self.env(crashpoint),
                       self.root / "serve.log")
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.proc.poll() is None, f"the server exited:\n{proc.tail()}"
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, START_TIMEOUT, "the server to be ready", interval=0.1)
        return proc, url

    def work(self, crashpoint: str | None = None) -> Process:
        proc = Process(WORKER, self.env(crashpoint), self.root / "worker.log")
        self.procs.append(proc)
        return proc

    def reach(self, proc: Process, what: str) -> None:
        wait_until(lambda: self.marker.exists() or proc.proc.poll() is not None, START_TIMEOUT, what)
        assert proc.proc.poll() is None, f"the process exited before {what}:\n{proc.tail()}"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill9()


@pytest.fixture()
def world(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[World]:
    w = World(tmp_path, tiny_checkpoint)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("crash") / "v.mp4"
    with VideoWriter(path, 10.0, 128, 64, crf=23) as writer:
        for _ in range(6):
            writer.write(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))
    return path.read_bytes()


def submit(url: str, data: bytes) -> str:
    r = httpx.post(f"{url}/v1/segment?format=zip", files={"video": ("v.mp4", data)}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def leftovers(jobs: Path) -> list[str]:
    """What remains in the job directory but records and this process's (empty) temp root."""
    return sorted(str(p.relative_to(jobs)) for p in jobs.rglob("*")
                  if p.parent.name != "records" and p.name not in ("records", "work") and
                  not (p.name.startswith("vss-") and p.is_dir() and not any(p.iterdir())))


@pytest.mark.parametrize("stage, was", [("upload_job_start", "running"), ("segment_frame", "running"),
                                        ("result_write", "running")])
def test_kill_9_during_an_upload_job(world: World, video: bytes, stage: str, was: str) -> None:
    server, url = world.serve(stage)
    job_id = submit(url, video)
    world.reach(server, f"the job at {stage}")
    if stage == "result_write":
        assert list((world.jobs / "work" / job_id).glob(".tmp-result.zip.*.part"))
    server.kill9()
    _, url = world.serve()
    r = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "failed" and job["error"]["code"] == "interrupted", job
    assert f"was {was}" in job["error"]["message"] and "submit the video again" in job["error"]["message"]
    assert httpx.get(f"{url}/v1/jobs/{job_id}/result", timeout=10).json()["error"]["code"] == "job_failed"
    assert leftovers(world.jobs) == [], "the dead server's upload, partial result or temp root was not swept"


def test_a_finished_job_survives_kill_9_with_its_result(world: World, video: bytes) -> None:
    server, url = world.serve()
    job_id = submit(url, video)
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"] == "done", 120, "the job")
    server.kill9()
    _, url = world.serve()
    assert httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"] == "done"
    r = httpx.get(f"{url}/v1/jobs/{job_id}/result", timeout=30)
    assert r.status_code == 200 and r.content[:2] == b"PK"


def fill_buffer(world: World) -> None:
    from adaptation.synth import generate_clip

    buffer = ClipBuffer(world.root / "buffer", heldout_fraction=0.5)
    for seed in range(40):
        buffer.add(generate_clip("fog", frames=2, size=(64, 128), seed=seed).frames)
        stats = buffer.stats()
        if stats["train_clips"] >= 1 and stats["heldout_clips"] >= 1:
            return
    raise AssertionError("no held-out clip")


def start_adapt(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/adapt", json={"method": "bn", "steps": 1}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def final_state(url: str, job_id: str, timeout: float = 240.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = httpx.get(f"{url}/v1/adapt/{job_id}", timeout=10).json()
        return job if job["state"] not in ("queued", "running", "gating") else None

    return wait_until(ended, timeout, "the adaptation job to end", interval=0.2)


def test_kill_9_with_a_queued_adapt_job_resumes_it(world: World) -> None:
    fill_buffer(world)
    server, url = world.serve()
    job = start_adapt(url)
    server.kill9()  # the job was accepted (202) and waits for a worker
    _, url = world.serve()
    assert httpx.get(f"{url}/v1/adapt/{job['id']}", timeout=10).json()["state"] == "queued"
    world.work()  # a worker comes back: it takes the job up
    wait_until(lambda: httpx.get(f"{url}/v1/adapt/{job['id']}", timeout=10).json()["state"] != "queued",
               START_TIMEOUT, "a worker to resume the job", interval=0.2)
    assert httpx.get(f"{url}/v1/adapt/{job['id']}", timeout=10).json()["state"] in ("running", "gating", "published")


@pytest.mark.parametrize("stage, reached", [("adapt_running", "training"), ("publish_staged", "publishing")])
def test_kill_9_of_the_worker_fails_the_job_and_sweeps_its_staging(world: World, stage: str, reached: str) -> None:
    fill_buffer(world)
    server, url = world.serve()
    job = start_adapt(url)
    worker = world.work(stage)
    world.reach(worker, f"the worker {reached}")
    if stage == "publish_staged":
        assert [p.name for p in world.models.root.iterdir() if p.name.startswith(".staging-")]
    worker.kill9()
    server.kill9()
    _, url = world.serve()
    ended = final_state(url, job["id"], timeout=30)
    assert ended["state"] == "failed" and ended["error"]["code"] == "worker_lost", ended
    assert sorted(p.name for p in world.models.root.iterdir()) == ["ACTIVE", "v0001"]  # staging swept at start
