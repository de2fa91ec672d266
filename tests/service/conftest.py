"""Service-test fixtures: a registry holding the tiny checkpoint, and TestClients that are ready to serve."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.waiting import wait_until


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    """Poll ``/readyz`` until the model is loaded."""
    wait_until(lambda: client.get("/readyz").status_code == 200, timeout, "the model to load", 0.02)


@pytest.fixture()
def start_client(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Callable[[Settings], TestClient]]:
    """``start(settings)``: an entered, ready TestClient; the tiny checkpoint is active in
    ``tmp_path / "models"``. Every client is closed at teardown."""
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    clients: list[TestClient] = []

    def start(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)
