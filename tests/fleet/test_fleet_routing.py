"""Per-domain routing with the registry on object storage: RETIRED markers on both backends, and a replica
that routes to a domain version published (and retired) by someone else on SeaweedFS S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.app import create_app
from service.registry import ModelRegistry, VersionNotFound
from service.storage import ObjectStore, S3Store
from service.store_registry import StoreRegistry
from tests.service.live import live_server
from tests.service.test_routing import domain_checkpoint, settings_for, stream, style_frames
from tests.waiting import wait_until


def test_retired_markers_on_every_backend(store: ObjectStore, tmp_path: Path, tiny_checkpoint: Path) -> None:
    for registry in (StoreRegistry(store, tmp_path / "cache"), ModelRegistry(tmp_path / "models")):
        registry.import_dir(tiny_checkpoint, activate=True)
        registry.import_dir(tiny_checkpoint)
        assert registry.retired() == set()
        registry.set_retired("v0002")
        registry.set_retired("v0002")  # idempotent
        assert registry.retired() == {"v0002"} and registry.versions() == ["v0001", "v0002"]
        registry.set_retired("v0002", False)
        assert registry.retired() == set()
        with pytest.raises(VersionNotFound):
            registry.set_retired("v0007")


def test_a_replica_routes_to_a_domain_version_published_on_the_store(
        s3_server, s3_url: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    publisher = StoreRegistry(S3Store(s3_url), tmp_path / "cache-publisher")
    publisher.import_dir(tiny_checkpoint, activate=True)
    app = create_app(settings_for(tmp_path, s3_url, worker="off"))
    with live_server(app, "ws", ws_max_size=64 * 2**20) as url:
        night = style_frames("night", 2, 6)
        assert stream(url, night)[0]["model_version"] == "v0001"
        # published while the replica runs, by another process's registry: the replica polls, loads, routes
        assert publisher.import_dir(domain_checkpoint(tiny_checkpoint, tmp_path / "n", "night", "night")) == "v0002"
        wait_until(lambda: [r.version for r in app.state.routes.table.routes] == ["v0002"], 60,
                   "the replica to load the night version")
        assert [m["model_version"] for m in stream(url, night)] == ["v0002"] * 2
        publisher.set_retired("v0002")
        wait_until(lambda: not app.state.routes.table.routes, 30, "the replica to drop the retired version")
        assert stream(url, night)[0]["model_version"] == "v0001"
        assert publisher.active() == "v0001"  # a domain version never moves ACTIVE
