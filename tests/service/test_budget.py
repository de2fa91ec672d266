"""The request budget, measured: no single request raises the server's RSS by more than 512 MiB.

A real ``vss serve`` runs in a subprocess on loopback with the default budget. For each worst case a
small request of the same kind runs first (lazy imports and pools are not the request's cost), then
the process's peak RSS is reset (``/proc/PID/clear_refs``), the request runs, and the growth of the
peak over the RSS before it is the request's cost. glibc's mmap threshold is pinned in the server so
freed buffers go back to the system and every request pays for its own memory (a stricter measure
than a warm allocator would give).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.budget import Budget, BudgetExceeded
from service.registry import ModelRegistry
from service.settings import Settings
from tests.waiting import wait_until

MIB = 2**20
LIMIT = 512 * MIB
API_KEY = "budget-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
UHD = (2160, 3840)  # the default pixel budget is one 3840x2160 frame


def test_budget_checks_name_the_limit_and_its_setting() -> None:
    budget = Budget.from_settings(Settings(_env_file=None, max_pixels=100 * 100, max_width=4096, max_height=4096))
    budget.check_pixels(100, 100, "a frame")
    with pytest.raises(BudgetExceeded, match=r"a frame of 101x100 = 10100 pixels .*10000.*VSS_MAX_PIXELS"):
        budget.check_pixels(100, 101, "a frame")
    small_sides = Budget.from_settings(Settings(_env_file=None, max_width=64, max_height=32))
    assert small_sides.max_pixels == 64 * 32  # the video sides bound the pixel budget too
    with pytest.raises(BudgetExceeded, match="VSS_WS_MAX_MESSAGE_BYTES"):
        budget.check_message(budget.max_message_bytes + 1)


@dataclass
class Server:
    url: str
    pid: int

    def rss(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def growth(self, request: Callable[[], object]) -> int:
        """Peak RSS during ``request()`` minus the RSS before it, in bytes."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        before = self.rss()
        request()
        return self.rss("VmHWM") - before


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Server]:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs a writable /proc/PID/clear_refs (Linux) to reset the peak RSS")
    root = tmp_path_factory.mktemp("budget")
    ModelRegistry(root / "models").import_dir(tiny_checkpoint, activate=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSS_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_=str(256 * 1024), VSS_API_KEY=API_KEY, VSS_DEMO_MODEL="none",
               VSS_BUFFER_DIR=str(root / "buffer"), VSS_JOB_DIR=str(root / "jobs"), VSS_CACHE_DIR=str(root / "cache"),
               VSS_WORKER="off", VSS_FLOW="dis-ultrafast", VSS_DEVICE="cpu", VSS_INTRA_OP_THREADS="1")
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--model-dir",
                             str(root / "models"), "--log-level", "warning"], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "the server to be ready")
        yield Server(url, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def stream(server: Server, config: dict, frame: bytes) -> tuple[dict, int | None]:
    """Send ``config`` and one frame; the server's first answer to the frame, and the close code if it closed."""
    with connect(server.url.replace("http", "ws") + "/v1/stream", max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps(config))
        first = json.loads(ws.recv(timeout=120))
        if first["type"] != "ready":
            return first, _close_code(ws)
        ws.send(frame)
        answer = json.loads(ws.recv(timeout=120))
        if answer["type"] == "frame":
            ws.recv(timeout=120)  # the label map
            return answer, None
        return answer, _close_code(ws)


def _close_code(ws) -> int | None:
    try:
        ws.recv(timeout=30)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    return None


def jpeg(h: int, w: int) -> bytes:
    return cv2.imencode(".jpg", np.full((h, w, 3), 90, np.uint8))[1].tobytes()


def png(h: int, w: int) -> bytes:
    frame = np.zeros((h, w, 3), np.uint8)
    frame[: h // 2] = (40, 160, 220)
    return cv2.imencode(".png", frame)[1].tobytes()


def test_no_stream_message_costs_more_than_512_mib(server: Server) -> None:
    stream(server, {"format": "rle", "size": [64, 64]}, jpeg(16, 16))  # warm-up
    costs = {}
    answers = {}

    def run(name: str, config: dict, frame: bytes) -> None:
        costs[name] = server.growth(lambda: answers.__setitem__(name, stream(server, config, frame)))

    run("size 8192x8192 + 16x16 JPEG", {"format": "rle", "size": [8192, 8192]}, jpeg(16, 16))
    run("size at the budget + 16x16 JPEG", {"format": "png", "size": list(UHD)}, jpeg(16, 16))
    run("3840x2160 PNG frame", {"format": "rle"}, png(*UHD))
    run("2560x2048 raw frame (15 MiB)", {"format": "rle", "raw": {"width": 2560, "height": 2048}},
        np.zeros((2048, 2560, 3), np.uint8).tobytes())
    print({name: f"{cost / MIB:.0f} MiB" for name, cost in costs.items()})
    assert answers["size 8192x8192 + 16x16 JPEG"] == ({"type": "error", "error": {
        "code": "too_many_pixels", "message": answers["size 8192x8192 + 16x16 JPEG"][0]["error"]["message"]}}, 1008)
    assert answers["size at the budget + 16x16 JPEG"][0]["height"] == UHD[0]
    assert answers["3840x2160 PNG frame"][0]["width"] == UHD[1]
    assert answers["2560x2048 raw frame (15 MiB)"][0]["width"] == 2560
    assert {name: cost for name, cost in costs.items() if cost > LIMIT} == {}


def test_no_clip_upload_costs_more_than_512_mib(server: Server) -> None:
    blank = cv2.imencode(".png", np.zeros((*UHD, 3), np.uint8))[1].tobytes()

    def post(images: list[bytes]) -> httpx.Response:
        files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        return httpx.post(f"{server.url}/v1/clips?clip_frames=8", files=files, headers=AUTH, timeout=300)

    assert post([png(64, 64)] * 2).status_code == 201  # warm-up
    responses = []
    cost = server.growth(lambda: responses.append(post([blank] * 40)))  # 40 blank 3840x2160 PNGs
    print(f"40 blank 3840x2160 PNGs ({40 * len(blank) / MIB:.2f} MiB): {cost / MIB:.0f} MiB")
    assert responses[0].status_code == 201, responses[0].text
    assert cost <= LIMIT


def test_no_upload_costs_more_than_512_mib(server: Server, tmp_path: Path) -> None:
    from service.video_io import VideoWriter

    def video(h: int, w: int, frames: int) -> bytes:
        path = tmp_path / f"{h}x{w}.mp4"
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        with VideoWriter(path, 10.0, w, h, preset="ultrafast") as writer:
            for i in range(frames):
                writer.write(np.broadcast_to((ramp + 20 * i) % 256, (h, w, 3)).astype(np.uint8))
        return path.read_bytes()

    def post(data: bytes, fmt: str) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/segment?format={fmt}", files={"video": ("v.mp4", data, "video/mp4")},
                          timeout=300)

    small = video(64, 128, 2)
    for fmt in ("mp4", "zip"):
        assert post(small, fmt).status_code == 200  # warm-up
    uhd = video(*UHD, 12)  # enough frames to fill the encoder's lookahead
    costs, statuses = {}, {}
    for fmt in ("mp4", "zip"):
        costs[fmt] = server.growth(lambda fmt=fmt: statuses.__setitem__(fmt, post(uhd, fmt).status_code))
    print({f"3840x2160 upload, {fmt}": f"{cost / MIB:.0f} MiB" for fmt, cost in costs.items()})
    assert statuses == {"mp4": 200, "zip": 200}
    assert {fmt: cost for fmt, cost in costs.items() if cost > LIMIT} == {}
