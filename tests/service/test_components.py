"""``create_app`` builds every part of the app eagerly and runs one lifespan: start in order, stop in reverse."""

from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.components import AdaptationPlane, Components
from service.drain import Drain
from service.drift import DriftMonitor
from service.segment_jobs import DataPlane
from service.engine_manager import EngineManager
from service.metrics import Metrics
from service.registry_api import Registry
from service.routing import DomainRoutes
from service.settings import Settings
from service.sources.manager import SourceManager

TYPES = {"settings": Settings, "metrics": Metrics, "registry": Registry, "engine_manager": EngineManager,
         "drain": Drain, "drift": DriftMonitor, "data_plane": DataPlane, "adaptation": AdaptationPlane,
         "sources": SourceManager, "routes": DomainRoutes}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = {"model_dir": tmp_path / "models", "buffer_dir": tmp_path / "buffer", "cache_dir": tmp_path / "cache",
            "job_dir": tmp_path / "jobs", "sources_output_dir": tmp_path / "sources", "demo_model": None,
            "registry_poll_ms": 50, "engine": "torch", "device": "cpu"}
    return Settings(_env_file=None, **{**base, **overrides})


def test_create_app_builds_every_part_before_startup(tmp_path: Path) -> None:
    """Right after ``create_app`` (no startup yet) ``app.state`` holds every part, wired to each other, and
    building started nothing: no thread, no file."""
    before = set(threading.enumerate())
    app = create_app(make_settings(tmp_path))
    assert {f.name for f in fields(Components)} == set(TYPES)
    for name, kind in TYPES.items():
        assert isinstance(getattr(app.state, name), kind), name
    state = app.state
    assert state.sources.engine_lock is state.data_plane.engine_lock is state.data_plane.batcher.lock
    assert state.sources.drift is state.drift and state.sources.engine_manager is state.engine_manager
    assert state.sources.routes is state.routes and state.routes.drift is state.drift
    assert state.routes.sync in state.engine_manager.followers  # polled by the watcher, which is not started
    assert state.adaptation.metrics is state.metrics and state.adaptation.supervisor is not None  # worker=spawn
    assert set(threading.enumerate()) - before == set()
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())


def test_lifespan_starts_in_order_and_stops_in_reverse(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, worker="off"))
    calls = record(app)
    with TestClient(app):
        assert calls == ["engine_manager.start", "data_plane.jobs.start", "adaptation.start"]
    assert calls[3:] == ["sources.close", "adaptation.close", "data_plane.close", "engine_manager.stop"]


def test_a_failed_start_stops_what_already_started(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, worker="off"))
    calls = record(app)

    def broken() -> None:
        calls.append("adaptation.start")
        raise RuntimeError("the buffer exploded")

    app.state.adaptation.start = broken
    with pytest.raises(RuntimeError, match="the buffer exploded"), TestClient(app):
        pass
    assert calls == ["engine_manager.start", "data_plane.jobs.start", "adaptation.start",
                     "data_plane.close", "engine_manager.stop"]


def record(app: Any) -> list[str]:
    """Wrap the start and stop methods of the app's parts so that their calls are listed in order."""
    calls: list[str] = []
    targets = {"engine_manager": ("start", "stop"), "data_plane.jobs": ("start",), "data_plane": ("close",),
               "adaptation": ("start", "close"), "sources": ("close",)}
    for path, methods in targets.items():
        obj = app.state
        for part in path.split("."):
            obj = getattr(obj, part)
        for method in methods:
            original = getattr(obj, method)

            def wrapped(*args: Any, _name: str = f"{path}.{method}", _original: Any = original, **kwargs: Any) -> Any:
                calls.append(_name)
                return _original(*args, **kwargs)

            setattr(obj, method, wrapped)
    return calls
