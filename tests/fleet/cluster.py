"""Fleet processes for tests and bench/fleet.py: `vss serve` replicas and a `vss worker` on one S3 store.

Each process gets its own cache and job directory and shares nothing on disk with the others: the
model registry, the clip buffer and the adaptation jobs are all on the S3 server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.sync.client import ClientConnection, connect

from models.config import DEMO_MODEL_DIR
from service.stream_codec import raw_frame

REPO = Path(__file__).resolve().parents[2]
VSS = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_env(s3_env: dict[str, str], root_url: str, work: Path, **extra: str) -> dict[str, str]:
    """Environment of one fleet process: the store for models, clips and jobs; local dirs of its own."""
    env = {**os.environ, **s3_env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "VSS_MODEL_DIR": f"{root_url}/models", "VSS_BUFFER_DIR": f"{root_url}/buffer",
           "VSS_CACHE_DIR": str(work / "cache"), "VSS_JOB_DIR": str(work / "jobs"), "VSS_DEMO_MODEL": "none",
           "VSS_INTRA_OP_THREADS": "1", "VSS_REGISTRY_POLL_MS": "100", "VSS_LOG_LEVEL": "info",
           "VSS_LOG_JSON": "false", "VSS_FLOW": "dis-ultrafast", "VSS_DEVICE": "cpu", **extra}
    env.pop("VSS_ADAPT_JOB_DIR", None)
    return env


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*VSS, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


class Replica(Process):
    def __init__(self, name: str, s3_env: dict[str, str], root_url: str, work: Path, **extra: str) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = fleet_env(s3_env, root_url, work / name, **{"VSS_WORKER": "external", **extra})
        super().__init__(["serve", "--host", "127.0.0.1", "--port", str(self.port)], env, work / f"{name}.log")
        key = extra.get("VSS_API_KEY")  # clients that hold the key send it: their traffic may feed the buffer
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, timeout=30.0, headers=self.auth)

    def serving(self) -> str | None:
        """The version /readyz reports, None while not ready or unreachable."""
        try:
            r = self.http.get("/readyz", timeout=5.0)
        except httpx.TransportError:
            return None
        return r.json()["model_version"] if r.status_code == 200 else None

    def stream(self, collect: bool = True) -> Stream:
        stack = ExitStack()
        ws = stack.enter_context(connect(f"ws://127.0.0.1:{self.port}/v1/stream", open_timeout=30,
                                         additional_headers=self.auth))
        ws.send(json.dumps({"format": "rle", "collect": collect}))
        hello = json.loads(ws.recv(timeout=60))
        return Stream(ws, hello, stack)

    def close(self) -> None:
        self.http.close()
        self.stop()


class Stream:
    """One websocket stream: send a frame, read its reply (metadata + label map)."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any], stack: ExitStack) -> None:
        self.ws, self.hello, self._stack = ws, hello, stack
        self.replies: list[dict[str, Any]] = []
        self.sent = 0

    def step(self, frame: np.ndarray) -> dict[str, Any]:
        self.ws.send(raw_frame(frame))
        self.sent += 1
        meta = json.loads(self.ws.recv(timeout=60))
        assert meta["type"] == "frame", meta
        assert isinstance(self.ws.recv(timeout=60), bytes)
        self.replies.append(meta)
        return meta

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001 - the server may be gone (killed on purpose)
            pass


def worker_process(s3_env: dict[str, str], root_url: str, work: Path, **extra: str) -> Process:
    env = fleet_env(s3_env, root_url, work / "worker", VSS_ADAPT_POLL_S="0.2", VSS_ADAPT_THREADS="1",
                    VSS_ADAPT_HEARTBEAT_S="1", **extra)
    return Process(["worker"], env, work / "worker.log")


def demo_checkpoint(target: Path, size: tuple[int, int] = (128, 256)) -> Path:
    """A copy of the bundled demo model that runs at ``size`` (it is fully convolutional)."""
    import shutil

    shutil.copytree(DEMO_MODEL_DIR, target)
    meta = json.loads((target / "meta.json").read_text())
    meta["input_size"] = list(size)
    (target / "meta.json").write_text(json.dumps(meta))
    return target
