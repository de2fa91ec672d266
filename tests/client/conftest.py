"""Fixture: one live server per test module, the tiny checkpoint active (see servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.registry import ModelRegistry
from tests.client.servers import Server, serve, settings_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("client-server")
    ModelRegistry(root / "models").import_dir(tiny_checkpoint, activate=True)
    with serve(settings_for(root)) as live:
        yield live
