"""Draining a real `vss serve` process on SIGTERM (service/drain.py): streams get a JSON reason and
close 1012, an upload in flight completes, new work is refused, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from service.drain import Drain, is_new_work
from service.registry import ModelRegistry
from service.stream_codec import raw_frame
from tests.service.test_replicas import VSS, free_port
from tests.service.test_stream import frames, reply
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0  # importing torch on two cores shared with other test runs
EXIT_TIMEOUT = 60.0
BOUNDARY = "vss-drain-test"


class Server:
    """One `vss serve` subprocess on loopback with its own registry, job dir and cache."""

    def __init__(self, root: Path, checkpoint: Path, **env: str) -> None:
        ModelRegistry(root / "models").import_dir(checkpoint, activate=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "serve.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "VSS_DEMO_MODEL": "none", "VSS_WORKER": "off",
                    "VSS_BUFFER_ENABLED": "false", "VSS_INTRA_OP_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "VSS_LOG_LEVEL": "info", "VSS_JOB_DIR": str(root / "jobs"), "VSS_CACHE_DIR": str(root / "cache"),
                    "VSS_BUFFER_DIR": str(root / "buffer"), **env}
        full_env.pop("VSS_API_KEY", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*VSS, "serve", "--port", str(self.port), "--model-dir", str(root / "models")],
                cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"the server exited:\n{self.log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def in_flight(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5.0).text
        line = next(x for x in text.splitlines() if x.startswith("vss_http_requests_in_flight "))
        return float(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture()
def server(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Server]:
    started = Server(tmp_path, tiny_checkpoint, VSS_DRAIN_TIMEOUT_S="60")
    try:
        wait_until(started.ready, START_TIMEOUT, "the server to be ready")
        yield started
    finally:
        started.stop()


class SlowUpload(threading.Thread):
    """POST /v1/segment whose body stops halfway until ``release`` is set (chunked transfer)."""

    def __init__(self, url: str, video: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.video = url, video
        self.release = threading.Event()
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def body(self) -> Iterator[bytes]:
        half = len(self.video) // 2
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="clip.mp4"\r\n'
               f"Content-Type: video/mp4\r\n\r\n").encode() + self.video[:half]
        assert self.release.wait(120), "the test never released the upload"
        yield self.video[half:] + f"\r\n--{BOUNDARY}--\r\n".encode()

    def run(self) -> None:
        try:
            self.response = httpx.post(f"{self.url}/v1/segment?format=json", content=self.body(), timeout=120.0,
                                       headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def draining_reason(ws: ClientConnection) -> tuple[dict, int]:
    """The JSON message sent before the close, and the close code."""
    message = json.loads(ws.recv(timeout=30))
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=30)
    assert info.value.rcvd is not None, "the server dropped the connection without a close frame"
    return message, info.value.rcvd.code


def test_sigterm_drains_streams_finishes_uploads_and_exits_0(server: Server, synthetic_video) -> None:
    ws_url = f"ws://127.0.0.1:{server.port}/v1/stream"
    upload = SlowUpload(server.url, synthetic_video.path.read_bytes())
    with connect(ws_url, max_size=None) as streaming, connect(ws_url, max_size=None) as silent:
        streaming.send(json.dumps({"format": "rle"}))
        assert json.loads(streaming.recv(timeout=30))["type"] == "ready"
        streaming.send(raw_frame(frames(1)[0]))
        assert reply(streaming)[0]["frame"] == 0
        # `silent` is connected but has not sent its config yet
        upload.start()
        # two websockets + the upload + this /metrics request itself
        wait_until(lambda: server.in_flight() >= 4, 30, "the upload to be in flight")

        server.proc.send_signal(signal.SIGTERM)

        message, code = draining_reason(streaming)
        assert code == 1012
        assert message["type"] == "error" and message["error"]["code"] == "draining", message
        assert message["last_frame"] == 0
        message, code = draining_reason(silent)
        assert (code, message["error"]["code"], message["last_frame"]) == (1012, "draining", None)

    ready = httpx.get(f"{server.url}/readyz", timeout=5.0)  # the upload keeps the listener open
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    refused = httpx.post(f"{server.url}/v1/segment", files={"video": ("a.mp4", b"0" * 16, "video/mp4")},
                         timeout=10.0)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    with pytest.raises(InvalidStatus) as denied:
        with connect(ws_url):
            pass
    assert denied.value.response.status_code == 503
    assert server.proc.poll() is None, "the server exited before the upload finished"

    upload.release.set()
    upload.join(60)
    assert upload.error is None, repr(upload.error)
    assert upload.response is not None and upload.response.status_code == 200, upload.response
    assert len(upload.response.json()["frames"]) == len(synthetic_video.frames)
    assert server.proc.wait(EXIT_TIMEOUT) == 0, server.log.read_text()[-3000:]
    assert "draining" in server.log.read_text()


def test_the_drain_timeout_bounds_the_wait(tmp_path: Path, tiny_checkpoint: Path, synthetic_video) -> None:
    server = Server(tmp_path, tiny_checkpoint, VSS_DRAIN_TIMEOUT_S="0.5")
    try:
        wait_until(server.ready, START_TIMEOUT, "the server to be ready")
        upload = SlowUpload(server.url, synthetic_video.path.read_bytes())
        upload.start()
        wait_until(lambda: server.in_flight() >= 2, 30, "the upload to be in flight")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(EXIT_TIMEOUT) == 0, server.log.read_text()[-3000:]
        assert "drain timeout: 1 request(s) still in flight" in server.log.read_text()
        upload.release.set()
        upload.join(60)
        assert upload.response is None or upload.response.status_code != 200  # cut off, never a fake success
    finally:
        server.stop()


def test_what_counts_as_new_work() -> None:
    assert is_new_work({"type": "http", "method": "POST", "path": "/v1/segment"})
    assert is_new_work({"type": "http", "method": "POST", "path": "/v1/adapt/"})
    assert is_new_work({"type": "websocket", "path": "/stream"})
    assert not is_new_work({"type": "http", "method": "GET", "path": "/v1/segment"})  # the 426 protocol page
    assert not is_new_work({"type": "http", "method": "POST", "path": "/v1/adapt/abc/cancel"})
    assert not is_new_work({"type": "http", "method": "GET", "path": "/readyz"})


def test_drain_tells_waiters_once_and_at_once_after_it_began() -> None:
    async def scenario() -> tuple[bool, bool, bool, bool]:
        drain = Drain()
        before = drain.started()
        forgotten = drain.started()
        forgotten.cancel()  # a stream that ended before the drain
        drain.active = 1
        idle_too_soon = await drain.wait_idle(0.01)
        drain.begin()
        after = drain.started()
        drain.active = 0
        return before.done(), after.done(), idle_too_soon, await drain.wait_idle(0.01)

    assert asyncio.run(scenario()) == (True, True, False, True)
