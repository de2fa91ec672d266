"""Two real `vss serve` processes sharing one model directory both follow the ACTIVE pointer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import main as cli_main
from service.commands.serve import check_bind
from service.registry import ModelRegistry
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
# The `vss` entry point without relying on an installed script (`python -m service.cli` would import
# service.cli twice, as __main__ and as service.cli).
VSS = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"]
START_TIMEOUT = 45.0  # two processes importing torch on two busy cores
SWITCH_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, model_dir: Path, log_dir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "VSS_DEMO_MODEL": "none", "VSS_REGISTRY_POLL_MS": "100",
               "VSS_INTRA_OP_THREADS": "1", "OMP_NUM_THREADS": "1", "VSS_LOG_LEVEL": "warning",
               "VSS_CACHE_DIR": str(log_dir / "cache")}
        env.pop("VSS_API_KEY", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*VSS, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--model-dir", str(model_dir)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0)

    def version(self) -> str | None:
        try:
            r = self.get("/v1/models/active")
        except httpx.TransportError:
            return None
        return r.json()["version"] if r.status_code == 200 else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_for(replicas: list[Replica], version: str, timeout: float) -> None:
    def exited() -> str | None:
        dead = next((r for r in replicas if r.proc.poll() is not None), None)
        return None if dead is None else f"replica exited ({dead.proc.returncode}):\n{dead.log.read_text()[-3000:]}"

    try:
        wait_until(lambda: all(r.version() == version for r in replicas), timeout, f"every replica to serve {version}",
                   0.1, give_up=exited)
    except AssertionError as e:
        logs = "\n".join(r.log.read_text()[-2000:] for r in replicas)
        raise AssertionError(f"{e}\n{logs}") from None


@pytest.fixture()
def model_dir(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    registry = ModelRegistry(tmp_path / "models")
    registry.import_dir(tiny_checkpoint, activate=True)
    shutil.copytree(registry.path("v0001"), registry.root / "v0002")
    return registry.root


@pytest.fixture()
def replicas(model_dir: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    started = [Replica(model_dir, tmp_path, name) for name in ("a", "b")]
    try:
        yield started
    finally:
        for r in started:
            r.stop()


def test_replicas_follow_activation_and_rollback(replicas: list[Replica], model_dir: Path) -> None:
    a, b = replicas
    wait_for(replicas, "v0001", START_TIMEOUT)
    assert "vss: serving on http://127.0.0.1:" in a.log.read_text()

    ModelRegistry(model_dir).activate("v0002")  # what the worker or `vss models activate` does
    wait_for(replicas, "v0002", SWITCH_TIMEOUT)

    r = httpx.post(f"{a.url}/v1/models/v0001/activate", timeout=30.0)  # rollback through one replica's API
    assert r.status_code == 200, r.text
    wait_for(replicas, "v0001", SWITCH_TIMEOUT)
    assert b.get("/v1/models/active").json()["swaps"] == 2
    assert 'vss_model_swaps_total 2.0' in b.get("/metrics").text


def test_serve_refuses_a_public_address_without_an_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("VSS_API_KEY", raising=False)
    assert cli_main(["serve", "--host", "0.0.0.0", "--model-dir", str(tmp_path)]) == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        check_bind(host, None, insecure=False)
    check_bind("0.0.0.0", "a-key", insecure=False)
    check_bind("192.168.1.10", None, insecure=True)
