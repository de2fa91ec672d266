"""Automatic rounds in the worker, in-process on a tiny model: domain versions, chain mode, gate off, reset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adaptation.gate import GateThresholds
from service.adapt_jobs import AdaptJobStore
from service.buffer import ClipBuffer
from service.registry import ModelRegistry
from service.settings import Settings
from service.worker import Worker, clip_buffer

SIZE = (64, 128)
LENIENT = GateThresholds(vanish_share=1.0, min_entropy_ratio=0.0, max_class_tv=1.0, tc_tolerance=100.0,
                         min_agreement=0.0)
STRICT = GateThresholds(min_agreement=100.5)  # no candidate can agree with its parent on > 100 % of pixels


def add(buffer: ClipBuffer, style: str, train: int, heldout: int, seed0: int = 0) -> None:
    """Add clips of ``style`` until at least ``train`` training and ``heldout`` held-out ones were added."""
    from adaptation.synth import generate_clip

    counts = {False: 0, True: 0}
    for seed in range(seed0, seed0 + 200):
        if counts[False] >= train and counts[True] >= heldout:
            return
        counts[buffer.add(generate_clip(style, frames=4, size=SIZE, seed=seed).frames, "test").heldout] += 1
    raise AssertionError("could not fill the buffer")


@pytest.fixture()
def env(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, Any]:
    registry = ModelRegistry(tmp_path / "models")
    registry.import_dir(tiny_checkpoint, activate=True)
    settings = Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir=tmp_path / "buffer",
                        demo_model=None, flow="dis-ultrafast", worker="off", adapt_min_clips=2,
                        adapt_heartbeat_s=0.2, adapt_poll_s=0.05, buffer_heldout_fraction=0.3,
                        adapt_auto_method="bn", adapt_auto_steps=1, adapt_auto_min_clips=3,
                        adapt_auto_interval_s=0.0)
    buffer = clip_buffer(settings)
    add(buffer, "source", 3, 1)
    return {"registry": registry, "settings": settings, "buffer": buffer,
            "jobs": AdaptJobStore(settings.job_root())}


def worker(env: dict[str, Any], thresholds: GateThresholds = LENIENT, **overrides: Any) -> Worker:
    settings = env["settings"].model_copy(update=overrides)
    torch.set_num_threads(1)
    return Worker(settings, jobs=env["jobs"], buffer=env["buffer"], registry=env["registry"], thresholds=thresholds)


def test_off_by_default_changes_nothing(env: dict[str, Any]) -> None:
    add(env["buffer"], "fog", 6, 2)
    w = worker(env)
    assert not w.auto.enabled and not w.poll_once()
    assert env["jobs"].list() == [] and env["jobs"].read_auto_state() is None


def test_a_drifted_style_gets_a_domain_version_and_active_stays(env: dict[str, Any]) -> None:
    w = worker(env, adapt_auto=True)
    assert not w.poll_once()  # source clips only: the base reference, no drift
    state = env["jobs"].read_auto_state()
    assert state["decision"]["drifted"] == 0 and state["base_reference"]["from"] == "earliest buffered clips"
    add(env["buffer"], "fog", 3, 1)
    assert w.poll_once()
    [job] = env["jobs"].list()
    assert (job["trigger"], job["state"], job["activated"]) == ("auto", "published", False), job["error"]
    fog_ids = {c.id for c in env["buffer"].clips()} - set(state["base_reference"]["clips"])
    assert set(job["clips"]["ids"]["train"]) | set(job["clips"]["ids"]["heldout"]) <= fog_ids
    registry: ModelRegistry = env["registry"]
    assert registry.active() == "v0001" and job["version"] == "v0002"
    meta = registry.meta("v0002")
    assert meta["domain"]["name"] == "auto-1" and meta["domain"]["signature_version"] == 1
    assert len(meta["domain"]["signature"]) == 30 and meta["domain"]["clips"] >= 4
    assert "stat_gate" in meta["provenance"]["gate"]["metrics"] and job["gate"]["passed"]
    state = env["jobs"].read_auto_state()
    assert state["rounds"]["started"] == 1 and state["rounds"]["published"] == 1
    assert state["last_outcome"]["version"] == "v0002"
    add(env["buffer"], "fog", 3, 1, seed0=50)
    assert not w.poll_once()  # fog is served by v0002 now: not drifted
    state = env["jobs"].read_auto_state()
    assert state["decision"]["drifted"] == 0 and state["references"] == {"v0001": "base_reference",
                                                                         "v0002": "domain"}


def test_the_gate_rejects_and_the_reason_is_kept(env: dict[str, Any]) -> None:
    w = worker(env, STRICT, adapt_auto=True)
    add(env["buffer"], "night", 3, 1)
    assert w.poll_once()
    [job] = env["jobs"].list()
    assert job["state"] == "rejected" and any("agreement" in r for r in job["gate"]["reasons"])
    state = env["jobs"].read_auto_state()
    assert state["rounds"] == {"started": 1, "published": 0, "rejected": 1, "failed": 0, "cancelled": 0}
    assert state["last_outcome"]["reasons"] == job["gate"]["reasons"]
    assert env["registry"].versions() == ["v0001"]


def test_chain_mode_with_the_gate_off_activates_and_resets(env: dict[str, Any]) -> None:
    w = worker(env, STRICT, adapt_auto=True, adapt_domains=False, adapt_gate="off", adapt_reset_every=2)
    add(env["buffer"], "fog", 3, 1)
    assert w.poll_once()
    first = env["jobs"].list()[0]
    assert (first["state"], first["activated"], first["parent"]) == ("published", True, "v0001"), first["error"]
    assert first["gate"]["passed"] is False and first["gate"]["policy"] == "off"  # what the gate would have said
    meta = env["registry"].meta("v0002")
    assert "domain" not in meta and meta["auto"]["mode"] == "chain" and meta["provenance"]["gate"]["policy"] == "off"
    assert env["registry"].active() == "v0002"
    add(env["buffer"], "night", 3, 1)  # drifted from v0002's fog signature: round 2, a periodic reset
    assert w.poll_once()
    second = env["jobs"].list()[0]
    assert (second["state"], second["parent"], second["request"]["auto"]["reset"]) == ("published", "v0001", True)
    assert env["registry"].active() == "v0003"


def test_the_state_survives_a_restart_and_says_when_the_policy_is_off(env: dict[str, Any]) -> None:
    w = worker(env, STRICT, adapt_auto=True)
    add(env["buffer"], "night", 3, 1)
    assert w.poll_once()
    before = env["jobs"].read_auto_state()
    again = worker(env, STRICT, adapt_auto=True)
    assert not again.poll_once()  # the night clips are not new any more
    after = env["jobs"].read_auto_state()
    assert after["rounds"] == before["rounds"] and after["base_reference"] == before["base_reference"]
    assert after["decision"]["drifted"] >= 4 and after["decision"]["drifted_new"] == 0
    off = worker(env)
    off.auto.start()
    assert env["jobs"].read_auto_state()["enabled"] is False
    assert env["jobs"].read_auto_state()["rounds"]["rejected"] == 1


def test_vss_worker_auto_starts_a_round_by_itself(env: dict[str, Any], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    add(env["buffer"], "fog", 3, 1)
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
           "worker", "--model-dir", str(tmp_path / "models"), "--buffer-dir", str(tmp_path / "buffer"), "--auto",
           "--once", "--log-level", "warning"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VSS_")}
    environ.update(PYTHONPATH=str(repo), VSS_FLOW="dis-ultrafast", VSS_ADAPT_NICE="0", OMP_NUM_THREADS="1",
                   VSS_ADAPT_AUTO_METHOD="bn", VSS_ADAPT_AUTO_STEPS="1", VSS_ADAPT_AUTO_MIN_CLIPS="3")
    done = subprocess.run(cmd, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [job] = env["jobs"].list()
    assert job["trigger"] == "auto" and job["state"] in ("published", "rejected"), job["error"]
    assert env["jobs"].read_auto_state()["rounds"]["started"] == 1


def test_the_base_reference_is_the_stored_source_signature(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import shutil

    from adaptation.source_stats import compute_source_stats
    from adaptation.synth import generate_clip
    from models.checkpoint import add_source_stats, load_checkpoint

    checkpoint = tmp_path / "with-stats"
    shutil.copytree(tiny_checkpoint, checkpoint)
    clip = generate_clip("source", frames=4, size=SIZE, seed=0)
    add_source_stats(checkpoint, compute_source_stats(load_checkpoint(checkpoint)[0], clip.frames, clip.labels))
    registry = ModelRegistry(tmp_path / "models")
    registry.import_dir(checkpoint, activate=True)
    settings = Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir=tmp_path / "buffer",
                        demo_model=None, flow="dis-ultrafast", worker="off", adapt_min_clips=2,
                        buffer_heldout_fraction=0.3, adapt_auto=True, adapt_auto_method="bn", adapt_auto_steps=1,
                        adapt_auto_min_clips=3)
    buffer = clip_buffer(settings)
    add(buffer, "fog", 3, 1)  # only shifted clips: the earliest-clips fallback would take fog as the base
    env = {"registry": registry, "settings": settings, "buffer": buffer, "jobs": AdaptJobStore(settings.job_root())}
    w = worker(env, adapt_auto=True)
    assert w.poll_once()
    state = env["jobs"].read_auto_state()
    assert state["base_reference"]["from"] == "source statistics of v0001"
    assert env["jobs"].list()[0]["trigger"] == "auto"
