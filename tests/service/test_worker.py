"""The adaptation worker in-process on a tiny model: publish, reject, NaN, cancel, disk full, auto policy."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adaptation.gate import GateThresholds
from adaptation.sourcefree import DEFAULTS
from service.adapt_jobs import AdaptJobStore, JobConflict
from service.buffer import ClipBuffer
from service.registry import ModelRegistry
from service.settings import Settings
from service.worker import Worker, clip_buffer
from tests.waiting import wait_until

SIZE = (64, 128)
LENIENT = GateThresholds(vanish_share=1.0, min_entropy_ratio=0.0, max_class_tv=1.0, tc_tolerance=100.0,
                         min_agreement=0.0)
STRICT = GateThresholds(min_agreement=100.5)  # no candidate can agree with its parent on > 100 % of pixels


def fill(buffer: ClipBuffer, train: int = 2, heldout: int = 1, style: str = "fog") -> None:
    """Add synthetic target clips until the buffer holds enough of both kinds (the split is by a hash of the frames)."""
    from adaptation.synth import generate_clip

    for seed in range(200):
        stats = buffer.stats()
        if stats["train_clips"] >= train and stats["heldout_clips"] >= heldout:
            return
        buffer.add(generate_clip(style, frames=4, size=SIZE, seed=seed).frames, "test")
    raise AssertionError("could not fill the buffer")


@pytest.fixture()
def env(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, Any]:
    registry = ModelRegistry(tmp_path / "models")
    registry.import_dir(tiny_checkpoint, activate=True)
    settings = Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir=tmp_path / "buffer",
                        demo_model=None, flow="dis-ultrafast", worker="off", adapt_min_clips=2,
                        adapt_heartbeat_s=0.2, adapt_poll_s=0.05, buffer_heldout_fraction=0.3)
    buffer = clip_buffer(settings)
    fill(buffer)
    jobs = AdaptJobStore(settings.job_root())
    return {"registry": registry, "settings": settings, "buffer": buffer, "jobs": jobs, "root": tmp_path}


def make_worker(env: dict[str, Any], thresholds: GateThresholds | None = LENIENT, **overrides: Any) -> Worker:
    settings = env["settings"].model_copy(update=overrides) if overrides else env["settings"]
    worker = Worker(settings, jobs=env["jobs"], buffer=env["buffer"], registry=env["registry"], thresholds=thresholds)
    torch.set_num_threads(1)
    return worker


def run(env: dict[str, Any], request: dict[str, Any], thresholds: GateThresholds | None = LENIENT) -> dict[str, Any]:
    job = env["jobs"].create(request)
    worker = make_worker(env, thresholds)
    assert worker.poll_once()
    return env["jobs"].get(job["id"])


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> None:
    wait_until(check, timeout, "the condition", 0.02)


def test_passing_candidate_is_published_and_activated(env: dict[str, Any]) -> None:
    job = run(env, {"method": "bn", "steps": 2})
    assert job["state"] == "published", job["error"]
    assert (job["version"], job["parent"], job["activated"]) == ("v0002", "v0001", True)
    assert job["gate"]["passed"] and job["progress"] == 1.0 and job["losses"][-1]["step"] == 2
    assert job["clips"]["train"] >= 2 and job["clips"]["heldout"] >= 1 and job["clips"]["heldout_from"] == "buffer"
    registry: ModelRegistry = env["registry"]
    assert registry.versions() == ["v0001", "v0002"] and registry.active() == "v0002"
    meta = registry.meta("v0002")
    assert meta["parent"] == "v0001" and meta["provenance"]["job_id"] == job["id"]
    assert set(meta["provenance"]["clips"]["heldout"]).isdisjoint(meta["provenance"]["clips"]["train"])
    assert meta["provenance"]["hyperparameters"]["batch_size"] == DEFAULTS["bn"]["config"]["batch_size"]
    # the statistical gate's interval (or its one-clip note) reaches the job record and meta.json alike
    assert "n_clips" in job["gate"]["metrics"]["stat_gate"]
    assert meta["provenance"]["gate"]["metrics"]["stat_gate"] == job["gate"]["metrics"]["stat_gate"]


def test_request_batch_size_overrides_the_method_default(env: dict[str, Any]) -> None:
    job = run(env, {"method": "bn", "steps": 1, "batch_size": 3})
    assert job["state"] == "published", job["error"]
    assert env["registry"].meta(job["version"])["provenance"]["hyperparameters"]["batch_size"] == 3


def test_rejected_candidate_leaves_active_unchanged(env: dict[str, Any]) -> None:
    job = run(env, {"method": "bn", "steps": 1}, STRICT)
    assert job["state"] == "rejected" and job["version"] is None
    assert job["gate"]["passed"] is False and any("agreement" in r for r in job["gate"]["reasons"])
    assert env["registry"].versions() == ["v0001"] and env["registry"].active() == "v0001"


def test_nan_loss_fails_the_job_with_the_reason(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptation.methods.tent import Tent
    from adaptation.trainer import LossOutput

    def nan_loss(self: Tent, model: torch.nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        out = model(batch["cur"], batch["prev"], batch.get("flow"))
        return LossOutput(out["fused"].sum() * float("nan"))

    monkeypatch.setattr(Tent, "loss", nan_loss)
    job = run(env, {"method": "tent", "steps": 3})
    assert job["state"] == "failed"
    assert job["error"]["code"] == "non_finite_loss" and "non-finite loss" in job["error"]["message"]
    assert env["registry"].versions() == ["v0001"] and env["registry"].active() == "v0001"


def training_job(env: dict[str, Any]) -> tuple[dict[str, Any], Worker, threading.Thread]:
    """A long TENT job that a worker thread is training (stopped again if it never gets there)."""
    jobs: AdaptJobStore = env["jobs"]
    job = jobs.create({"method": "tent", "steps": 100000})
    worker = make_worker(env)
    thread = threading.Thread(target=worker.poll_once)
    thread.start()
    try:
        wait_for(lambda: jobs.get(job["id"])["stage"] == "train")
    except BaseException:
        worker.stop_event.set()
        thread.join(60)
        raise
    return job, worker, thread


def test_cancelling_a_running_job(env: dict[str, Any]) -> None:
    jobs: AdaptJobStore = env["jobs"]
    job, _, thread = training_job(env)
    try:
        assert jobs.request_cancel(job["id"])["cancel_requested"]
    finally:
        thread.join(60)
    done = jobs.get(job["id"])
    assert done["state"] == "cancelled" and done["version"] is None
    assert env["registry"].versions() == ["v0001"]


def test_cancelling_a_queued_job_and_one_job_at_a_time(env: dict[str, Any]) -> None:
    jobs: AdaptJobStore = env["jobs"]
    job = jobs.create({"method": "bn", "steps": 1})
    with pytest.raises(JobConflict, match="one job runs at a time"):
        jobs.create({"method": "bn", "steps": 1})
    assert jobs.request_cancel(job["id"])["state"] == "cancelled"
    assert not make_worker(env).poll_once()  # nothing left to claim
    assert jobs.create({"method": "bn", "steps": 1})["state"] == "queued"  # the slot is free again


def test_a_stopped_worker_fails_its_job(env: dict[str, Any]) -> None:
    jobs: AdaptJobStore = env["jobs"]
    job, worker, thread = training_job(env)
    worker.stop_event.set()  # what SIGTERM does
    thread.join(60)
    assert jobs.get(job["id"])["error"]["code"] == "worker_stopped"


def test_disk_full_while_publishing_keeps_the_registry_consistent(env: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import service.registry as registry_module

    def full_disk(directory: Path, model: Any, meta: dict[str, Any]) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_module, "save_checkpoint", full_disk)
    job = run(env, {"method": "bn", "steps": 1})
    assert job["state"] == "failed" and job["error"]["code"] == "publish_failed"
    assert "No space left on device" in job["error"]["message"]
    root: Path = env["registry"].root
    assert env["registry"].versions() == ["v0001"] and env["registry"].active() == "v0001"
    assert sorted(p.name for p in root.iterdir()) == ["ACTIVE", "v0001"]  # no staging leftovers


def test_too_few_clips_fails_clearly(env: dict[str, Any]) -> None:
    env["buffer"].clear()
    job = run(env, {"method": "bn", "steps": 1})
    assert job["state"] == "failed" and job["error"]["code"] == "not_enough_clips"


def test_labeled_validation_clips_decide_by_miou(env: dict[str, Any]) -> None:
    from adaptation.synth import generate_clip

    val_dir = env["root"] / "val"
    val_dir.mkdir()
    clip = generate_clip("fog", frames=3, size=SIZE, seed=77)
    np.savez(val_dir / "a.npz", frames=clip.frames, labels=clip.labels, flow=clip.flow)
    env["settings"] = env["settings"].model_copy(update={"val_dir": val_dir})
    job = run(env, {"method": "bn", "steps": 1}, None)
    assert job["state"] in ("published", "rejected"), job["error"]
    assert {"miou_parent", "miou_candidate"} <= set(job["gate"]["metrics"])
    assert job["clips"]["val"] == 1
    better = job["gate"]["metrics"]["miou_candidate"] >= job["gate"]["metrics"]["miou_parent"]
    assert (job["state"] == "published") == better


def test_auto_policy_starts_a_job_after_enough_new_clips(env: dict[str, Any]) -> None:
    worker = make_worker(env, adapt_auto_clips=len(env["buffer"].clips()), adapt_auto_method="bn",
                         adapt_auto_steps=1)
    assert worker.poll_once()
    [job] = env["jobs"].list()
    assert job["trigger"] == "auto" and job["state"] == "published"
    assert not worker.poll_once()  # no new clip since that job
    off = make_worker(env)
    fill(env["buffer"], train=10, heldout=1)
    assert not off.poll_once()  # the policy is off by default


def test_reaping_jobs_of_dead_or_silent_workers(tmp_path: Path) -> None:
    jobs = AdaptJobStore(tmp_path)
    dead = jobs.create({"method": "bn", "steps": 1})
    jobs.claim({"pid": 2**22 + 12345, "host": socket.gethostname()})  # no such pid
    assert jobs.reap(timeout_s=3600) == [dead["id"]]
    assert jobs.get(dead["id"])["error"]["code"] == "worker_lost"
    silent = jobs.create({"method": "bn", "steps": 1})
    jobs.claim({"pid": 1, "host": "another-host"})
    assert jobs.reap(timeout_s=3600) == []
    assert jobs.reap(timeout_s=5, now=time.time() + 10) == [silent["id"]]
    assert "no heartbeat" in jobs.get(silent["id"])["error"]["message"]


def test_vss_worker_command_runs_a_queued_job(env: dict[str, Any]) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    job = env["jobs"].create({"method": "bn", "steps": 1})
    root: Path = env["root"]
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
           "worker", "--model-dir", str(root / "models"), "--buffer-dir", str(root / "buffer"), "--once",
           "--log-level", "warning"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VSS_")}
    environ.update(PYTHONPATH=str(repo), VSS_FLOW="dis-ultrafast", VSS_BUFFER_HELDOUT_FRACTION="0.3",
                   VSS_ADAPT_NICE="0", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=root, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = env["jobs"].get(job["id"])
    assert state["state"] in ("published", "rejected"), state["error"]
    assert state["worker"]["pid"] != os.getpid() and state["gate"]["metrics"]["finite"] is True
    assert env["jobs"].workers(60) == []  # the worker removed its heartbeat file on exit
