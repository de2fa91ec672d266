"""Model registry on disk (atomic publish, ACTIVE pointer, names) and the live-engine manager (hot swap)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.accel import build_model
from models.checkpoint import CheckpointError, read_meta
from models.config import get_config
from service.engine_manager import EngineLoadError, EngineManager, EngineOptions, NotReady, make_engine_factory
from service.registry import (ACTIVE_FILE, STAGING_PREFIX, InvalidVersion, ModelRegistry, VersionNotFound,
                              validate_version)
from tests.waiting import wait_until


class FakeEngine:
    """A cheap engine: 'warm' is set only once construction finished, so a torn read would show."""

    backend = "fake"

    def __init__(self, version: str, meta: dict[str, Any]) -> None:
        self.version, self.meta = version, meta
        self.warm = False
        self.calls = 0

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        self.calls += 1
        n, _, h, w = frames.shape
        return np.zeros((n, 7, h // 8, w // 8), np.float32)

    def fuse(self, current: np.ndarray, previous: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
        return current


def fake_factory(broken: set[str] | None = None, delay: float = 0.0):
    def build(version: str, directory: Path, meta: dict[str, Any]) -> FakeEngine:
        if broken and version in broken:
            raise RuntimeError(f"cannot build {version}")
        engine = FakeEngine(version, meta)
        time.sleep(delay)
        engine.warm = True
        return engine
    return build


def make_registry(root: Path, checkpoint: Path, count: int) -> ModelRegistry:
    """``count`` versions with the same weights (v0001 imported, the rest copied), v0001 active."""
    reg = ModelRegistry(root)
    reg.import_dir(checkpoint)
    for i in range(2, count + 1):
        shutil.copytree(reg.path("v0001"), root / f"v{i:04d}")
    reg.activate("v0001")
    return reg


@pytest.fixture()
def registry(tmp_path: Path, tiny_checkpoint: Path) -> ModelRegistry:
    """A registry with three versions (same weights) and v0001 active."""
    return make_registry(tmp_path / "models", tiny_checkpoint, 3)


def test_version_names_are_validated() -> None:
    for good in ("v0001", "v1234", "v00001", "v123456"):
        assert validate_version(good) == good
    for bad in ("", "v1", "v001", "0001", "V0001", "v0001/", "../v0001", "v0001/../x", "v00a1", " v0001",
                "v0001\n", "v0001.tmp"):
        with pytest.raises(InvalidVersion):
            validate_version(bad)


def test_publish_is_atomic_and_records_the_parent(tmp_path: Path, tiny_checkpoint: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    assert reg.versions() == [] and reg.active() is None
    first = reg.import_dir(tiny_checkpoint)
    meta = read_meta(tiny_checkpoint)
    second = reg.publish(build_model(get_config("mini-os8")), meta, parent=first)
    assert (first, second) == ("v0001", "v0002")
    assert reg.meta(second)["parent"] == "v0001"
    assert sorted(p.name for p in reg.path(second).iterdir()) == ["meta.json", "model.safetensors"]
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".")], "staging directories left behind"


def test_failed_publish_leaves_no_version(tmp_path: Path, tiny_checkpoint: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.import_dir(tiny_checkpoint)

    def crash(directory: Path, model: Any, meta: dict[str, Any]) -> Path:
        Path(directory).mkdir()
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("service.registry.save_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        reg.publish(build_model(get_config("mini-os8")), read_meta(tiny_checkpoint))
    assert reg.versions() == ["v0001"]
    assert not [p for p in reg.root.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path, tiny_checkpoint: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    results: list[str] = []
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            results.append(ModelRegistry(reg.root).import_dir(tiny_checkpoint))
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == ["v0001", "v0002", "v0003", "v0004"] == reg.versions()


def test_ensure_ignores_a_staging_directory_committed_while_listing(tmp_path: Path, monkeypatch) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.root.mkdir()
    staging = reg.root / f"{STAGING_PREFIX}other-publisher"
    staging.mkdir()
    listing = list(reg.root.iterdir())
    staging.rename(reg.root / "v0001")  # the other publisher commits between the listing and the stat
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listing))
    reg.ensure()
    assert (reg.root / "v0001").is_dir()


def test_import_rejects_corrupt_checkpoints(tmp_path: Path, tiny_checkpoint: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    reg = ModelRegistry(tmp_path / "models")
    with pytest.raises(CheckpointError, match="sha256"):
        reg.import_dir(bad)
    assert reg.versions() == []


def test_active_pointer_and_rollback(registry: ModelRegistry) -> None:
    assert registry.versions() == ["v0001", "v0002", "v0003"]
    assert registry.active() == "v0001"
    registry.activate("v0003")
    assert (registry.root / ACTIVE_FILE).read_text() == "v0003\n"
    registry.activate("v0002")  # rollback is just another activation
    assert registry.active() == "v0002"
    with pytest.raises(VersionNotFound):
        registry.activate("v0009")
    with pytest.raises(InvalidVersion):
        registry.activate("../../etc")
    assert registry.active() == "v0002"
    assert sorted(p.name for p in registry.root.iterdir() if p.name.startswith(".")) == [], "temp pointer left"


def test_garbage_pointer_is_an_error(registry: ModelRegistry) -> None:
    (registry.root / ACTIVE_FILE).write_text("../../secret\n")
    with pytest.raises(InvalidVersion):
        registry.active()


def test_seed_initialises_only_an_empty_registry(tmp_path: Path, tiny_checkpoint: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    assert reg.seed(None) is None and reg.versions() == []
    assert reg.seed(tiny_checkpoint) == "v0001" and reg.active() == "v0001"
    assert reg.seed(tiny_checkpoint) is None and reg.versions() == ["v0001"]
    reg.import_dir(tiny_checkpoint)
    (reg.root / ACTIVE_FILE).unlink()
    assert reg.seed(tiny_checkpoint) == "v0002" and reg.active() == "v0002"  # newest when the pointer is lost


def test_stale_staging_directories_are_removed(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.ensure()
    stale, fresh = reg.root / f"{STAGING_PREFIX}old", reg.root / f"{STAGING_PREFIX}new"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    reg.ensure()
    assert not stale.exists() and fresh.exists()


# --- EngineManager -------------------------------------------------------------------------------
def test_manager_is_not_ready_before_the_first_load(registry: ModelRegistry) -> None:
    manager = EngineManager(registry, fake_factory(), warmup=False)
    with pytest.raises(NotReady):
        manager.current()
    assert manager.sync() is True
    assert manager.current().version == "v0001" and manager.ready
    assert manager.sync() is False and manager.swaps == 0


def test_hot_swap_under_load_has_no_torn_reads(tmp_path: Path, tiny_checkpoint: Path) -> None:
    reg = make_registry(tmp_path / "models", tiny_checkpoint, 12)
    versions = reg.versions()
    manager = EngineManager(reg, fake_factory(delay=0.002), warmup=False)
    manager.sync()
    seen: list[list[int]] = [[], [], []]  # one sequence per reader thread
    problems: list[str] = []
    stop = threading.Event()

    def reader(out: list[int]) -> None:
        while not stop.is_set():
            engine = manager.current()
            if not engine.warm:
                problems.append(f"got a half-built engine {engine.version}")
            out.append(int(engine.version[1:]))
            time.sleep(0)  # let the swapping thread run

    readers = [threading.Thread(target=reader, args=(out,)) for out in seen]
    for t in readers:
        t.start()
    try:
        for i, version in enumerate(versions[1:]):
            # every reader is reading while the next engine is built and swapped in
            wait_until(lambda n=int(manager.version[1:]): all(reads and reads[-1] == n for reads in seen), 30,
                       f"every reader to see {manager.version}")
            if i % 2:
                manager.activate(version)  # the route's path
            else:
                reg.activate(version)  # another process moved the pointer: the watcher's path
                assert manager.sync() is True
        wait_until(lambda: all(reads[-1] == len(versions) for reads in seen), 30, "every reader to see the last")
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not problems
    for reads in seen:
        assert all(a <= b for a, b in zip(reads, reads[1:])), "a reader saw the version go backwards"
        assert sorted(set(reads)) == list(range(1, len(versions) + 1)), "a reader missed a version"
    assert manager.version == versions[-1] and manager.swaps == len(versions) - 1
    assert reg.active() == versions[-1]


def test_failed_load_keeps_the_old_engine(registry: ModelRegistry) -> None:
    manager = EngineManager(registry, fake_factory(broken={"v0002"}), warmup=False, retry_failed_s=3600)
    manager.sync()
    old = manager.current()
    registry.activate("v0002")  # e.g. the worker or another replica moved the pointer
    assert manager.sync() is False
    assert manager.current() is old and manager.swap_failures == 1
    assert manager.last is not None and not manager.last.ok and "cannot build v0002" in manager.last.error
    assert manager.sync() is False and manager.swap_failures == 1  # not retried on every poll
    with pytest.raises(EngineLoadError):
        manager.activate("v0002")  # the route path: nothing changes either
    registry.activate("v0001")
    with pytest.raises(EngineLoadError):
        manager.activate("v0002")
    assert registry.active() == "v0001", "ACTIVE must not point at a version that failed to load"
    assert manager.activate("v0003").version == "v0003"


def test_rewritten_pointer_retries_a_failed_version(registry: ModelRegistry) -> None:
    broken = {"v0002"}
    manager = EngineManager(registry, fake_factory(broken=broken), warmup=False, retry_failed_s=3600)
    manager.sync()
    registry.activate("v0002")
    assert manager.sync() is False
    broken.clear()  # e.g. the GPU memory was freed
    stamp = registry.active_stamp()
    registry.activate("v0002")  # a new write of the pointer (new mtime) asks for a retry
    later = stamp[0] + 1_000_000_000  # a write in the same clock tick keeps the mtime: date this one 1 s later
    os.utime(registry.root / ACTIVE_FILE, ns=(later, later))
    assert manager.sync() is True and manager.version == "v0002"


def test_watcher_thread_follows_the_pointer(registry: ModelRegistry) -> None:
    manager = EngineManager(registry, fake_factory(), poll_interval_s=0.02, warmup=False)
    manager.start()
    try:
        wait_until(lambda: manager.version == "v0001", 10, "the watcher to load v0001")
        registry.activate("v0003")
        wait_until(lambda: manager.version == "v0003", 10, "the watcher to follow ACTIVE to v0003")
    finally:
        manager.stop()
    assert manager.swaps == 1


def test_torch_engine_factory_loads_and_warms_up(registry: ModelRegistry) -> None:
    torch.set_num_threads(1)
    manager = EngineManager(registry, make_engine_factory(EngineOptions("torch", "cpu")))
    assert manager.sync()
    engine = manager.current()
    assert engine.backend == "torch" and engine.version == "v0001"
    logits = engine.frame_logits(np.zeros((2, 3, 64, 128), np.float32))
    assert logits.shape == (2, 7, 8, 16)


def test_corrupt_weights_in_the_registry_keep_the_old_engine(registry: ModelRegistry) -> None:
    torch.set_num_threads(1)
    manager = EngineManager(registry, make_engine_factory(EngineOptions("torch", "cpu")), retry_failed_s=3600)
    manager.sync()
    (registry.path("v0002") / "model.safetensors").write_bytes(b"not safetensors")
    registry.activate("v0002")
    assert manager.sync() is False
    assert manager.current().version == "v0001"
    assert "sha256" in (manager.last.error or "")


# --- `vss models` ----------------------------------------------------------------------------------
def test_models_command_imports_lists_and_activates(tmp_path: Path, tiny_checkpoint: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from service.cli import main

    root = str(tmp_path / "models")
    assert main(["models", "--model-dir", root, "list"]) == 0
    assert "no model versions" in capsys.readouterr().out
    assert main(["models", "--model-dir", root, "import", str(tiny_checkpoint), "--activate"]) == 0
    assert main(["models", "import", str(tiny_checkpoint), "--model-dir", root]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["models", "--model-dir", root, "activate", "v0002"]) == 0
    capsys.readouterr()
    assert main(["models", "--model-dir", root, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  v0001") and lines[2].startswith("* v0002") and "resnet-mini" in lines[2]
    assert main(["models", "--model-dir", root, "list", "--json"]) == 0
    assert '"active": "v0002"' in capsys.readouterr().out
    assert main(["models", "--model-dir", root, "activate", "v0007"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["models", "--model-dir", root, "activate", "../x"]) == 2
    assert "invalid model version" in capsys.readouterr().err
    (tmp_path / "models" / "v0001" / "model.safetensors").write_bytes(b"broken")
    assert main(["models", "--model-dir", root, "activate", "v0001"]) == 2  # never point ACTIVE at bad weights
    assert "sha256" in capsys.readouterr().err
    assert ModelRegistry(root).active() == "v0002"
