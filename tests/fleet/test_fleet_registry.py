"""The model registry on object storage, on both backends (a local directory and SeaweedFS S3)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from service.engine_manager import EngineManager, EngineOptions, make_engine_factory
from service.registry import VersionNotFound
from service.storage import ObjectStore
from service.store_registry import MANIFEST, ActivationConflict, CorruptVersion, StoreRegistry


def replica(store: ObjectStore, tmp_path: Path, name: str) -> StoreRegistry:
    """A registry as one replica sees it: the shared store, a cache of its own."""
    return StoreRegistry(store, tmp_path / f"cache-{name}")


@pytest.fixture
def two_versions(store: ObjectStore, tmp_path: Path, tiny_checkpoint: Path) -> StoreRegistry:
    reg = replica(store, tmp_path, "publisher")
    assert reg.import_dir(tiny_checkpoint, activate=True) == "v0001"
    model, meta = load_checkpoint(tiny_checkpoint)
    assert reg.publish(model, meta, parent="v0001") == "v0002"
    return reg


def test_versions_are_verified_copies(two_versions: StoreRegistry, store: ObjectStore, tmp_path: Path) -> None:
    other = replica(store, tmp_path, "b")
    assert other.versions() == ["v0001", "v0002"] and other.active() == "v0001"
    assert other.meta("v0002")["parent"] == "v0001" and not other.has_onnx("v0002")
    path = other.path("v0002")
    assert path.parent.parent == tmp_path / "cache-b" / "models"
    load_checkpoint(path)  # the download is a complete checkpoint
    with pytest.raises(VersionNotFound):
        other.check("v0009")
    with pytest.raises(VersionNotFound):
        other.activate("v0009")


def test_concurrent_activations_have_exactly_one_winner(two_versions: StoreRegistry, store: ObjectStore,
                                                        tmp_path: Path, tiny_checkpoint: Path) -> None:
    for _ in range(6):
        two_versions.import_dir(tiny_checkpoint)  # v0003 .. v0008
    replicas = [replica(store, tmp_path, str(i)) for i in range(8)]
    stamp = replicas[0].active_stamp()
    assert stamp is not None and stamp[1] == "v0001"
    barrier, won, conflicts = threading.Barrier(8), [], []

    def activate(i: int) -> None:
        barrier.wait()
        try:
            replicas[i].activate(f"v{i + 1:04d}", if_stamp=stamp[0])  # all decided on the same pointer
            won.append(f"v{i + 1:04d}")
        except ActivationConflict as e:
            conflicts.append(str(e))

    threads = [threading.Thread(target=activate, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(conflicts) == 7, (won, conflicts)
    assert all("was changed by another activation" in c for c in conflicts)
    assert {replica.active() for replica in replicas} == {won[0]}  # every replica reads the one winner


def test_racing_activations_each_win_against_what_they_read(two_versions: StoreRegistry, store: ObjectStore,
                                                            tmp_path: Path) -> None:
    """Without a stamp an activation compares against the pointer it just read: none is lost silently."""
    replicas = [replica(store, tmp_path, str(i)) for i in range(8)]
    barrier, won, lost = threading.Barrier(8), [], []

    def activate(i: int) -> None:
        barrier.wait()
        try:
            replicas[i].activate("v0002" if i % 2 else "v0001")
            won.append(i)
        except ActivationConflict:
            lost.append(i)

    threads = [threading.Thread(target=activate, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won and len(won) + len(lost) == 8
    assert replicas[0].active() in ("v0001", "v0002")


def test_rollback_is_one_write(two_versions: StoreRegistry) -> None:
    two_versions.activate("v0002")
    before = two_versions.store.list()
    two_versions.activate("v0001")
    after = two_versions.store.list()
    changed = {o.key for o in after} ^ {o.key for o in before} | \
        {a.key for a, b in zip(after, before) if a.etag != b.etag}
    assert changed == {"ACTIVE"} and two_versions.active() == "v0001"


def test_a_torn_upload_is_never_visible(two_versions: StoreRegistry, store: ObjectStore, tmp_path: Path,
                                        tiny_checkpoint: Path) -> None:
    # A publisher that died after claiming v0003 and uploading the weights, before the manifest.
    store.put("v0003/CLAIM", b"{}", create_only=True)
    store.put("v0003/model.safetensors", (tiny_checkpoint / "model.safetensors").read_bytes())
    other = replica(store, tmp_path, "b")
    assert other.versions() == ["v0001", "v0002"]
    with pytest.raises(VersionNotFound):
        other.path("v0003")
    with pytest.raises(VersionNotFound):
        other.activate("v0003")
    assert not (tmp_path / "cache-b").exists() or "v0003" not in {p.name for p in other.cache.iterdir()}
    assert other.import_dir(tiny_checkpoint) == "v0004"  # the next publish skips the claimed name
    assert other.versions() == ["v0001", "v0002", "v0004"]


def test_concurrent_publishers_get_distinct_versions(store: ObjectStore, tmp_path: Path,
                                                     tiny_checkpoint: Path) -> None:
    replicas = [replica(store, tmp_path, str(i)) for i in range(4)]
    barrier, names = threading.Barrier(4), []

    def publish(i: int) -> None:
        barrier.wait()
        names.append(replicas[i].import_dir(tiny_checkpoint))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == ["v0001", "v0002", "v0003", "v0004"]
    assert replicas[0].versions() == sorted(names)


def test_replicas_starting_together_seed_once(store: ObjectStore, tmp_path: Path, tiny_checkpoint: Path) -> None:
    replicas = [replica(store, tmp_path, str(i)) for i in range(3)]
    barrier, seeded = threading.Barrier(3), []

    def seed(i: int) -> None:
        barrier.wait()
        seeded.append(replicas[i].seed(tiny_checkpoint))

    threads = [threading.Thread(target=seed, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seeded.count("v0001") == 1 and seeded.count(None) == 2
    assert replicas[0].versions() == ["v0001"] and replicas[2].active() == "v0001"
    assert replicas[1].seed(tiny_checkpoint) is None  # already initialised


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_version_is_refused_and_never_served(two_versions: StoreRegistry, store: ObjectStore,
                                                       tmp_path: Path, damage: str) -> None:
    manager = EngineManager(replica(store, tmp_path, "serving"), make_engine_factory(EngineOptions(device="cpu")),
                            retry_failed_s=0.0)
    assert manager.sync() and manager.version == "v0001"
    weights = store.get("v0002/model.safetensors").data
    store.put("v0002/model.safetensors", weights[:-1] + bytes([weights[-1] ^ 1]) if damage == "flip" else weights[:100])
    two_versions.activate("v0002")
    assert manager.sync() is False
    assert manager.version == "v0001" and manager.swap_failures == 1
    assert manager.last is not None and not manager.last.ok and "is corrupt: model.safetensors" in manager.last.error
    assert not (manager.registry.cache / "v0002").exists()  # nothing half-downloaded is kept
    # Repairing the object (same manifest) lets the version in.
    store.put("v0002/model.safetensors", weights)
    assert manager.sync() and manager.version == "v0002"


def test_a_damaged_manifest_is_refused(two_versions: StoreRegistry, store: ObjectStore, tmp_path: Path) -> None:
    store.put(f"v0002/{MANIFEST}", b'{"version": "v0002", "files": {"../x": {}}}')
    with pytest.raises(CorruptVersion):
        replica(store, tmp_path, "b").path("v0002")
