"""A camera-like source: GStreamer's RTSP server (tests/rtsp_server.py, run by the system python) on
loopback, pulled over RTSP/TCP, dropped and brought back."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import ClientConnection

from tests.service.sources_support import (Server, create, frames_from, next_message, source_threads, state_of,
                                           subscribe, vss_server, wait_state)

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).resolve().parents[1] / "rtsp_server.py"
PROBE = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
         "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
         "assert all(Gst.ElementFactory.find(e) for e in ('videotestsrc', 'x264enc', 'rtph264pay')), 'plugins'")
PACKAGES = ("python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
            "gstreamer1.0-plugins-ugly")  # videotestsrc, rtph264pay, x264enc


def _rtsp_server_missing() -> str | None:
    try:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{SYSTEM_PYTHON} cannot run: {e}"
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["probe failed"])[-1]


pytestmark = pytest.mark.skipif(bool(missing := _rtsp_server_missing()),
                                reason=f"GStreamer's RTSP server is not installed ({missing}); "
                                       f"apt-get install {PACKAGES}")


class Camera:
    """The RTSP server process; ``start`` (again on the same port after ``stop``)."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen([SYSTEM_PYTHON, str(SCRIPT), "--port", str(self.port)],
                                        stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while not select.select([self.process.stdout], [], [], max(deadline - time.monotonic(), 0))[0]:
            assert time.monotonic() < deadline, "the RTSP server did not start"
        line = self.process.stdout.readline().split()
        assert line[:1] == ["ready"], f"the RTSP server said {line!r} (exit code {self.process.poll()})"
        self.port = int(line[1])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a camera losing power: no goodbye
            self.process.wait(30)

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"


@pytest.fixture()
def camera() -> Iterator[Camera]:
    cam = Camera()
    cam.start()
    yield cam
    cam.stop()


@pytest.fixture()
def server(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Server]:
    with vss_server(tmp_path, tiny_checkpoint, sources_read_timeout_s=3.0) as live:
        yield live


def until(ws: ClientConnection, predicate: Callable[[dict], bool], what: str, timeout: float = 60.0) -> list[dict]:
    """Messages up to and including the first one ``predicate`` accepts."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while not seen or not predicate(seen[-1]):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s (saw {[m['type'] for m in seen]})"
        seen.append(next_message(ws, timeout)[0])
    return seen


def test_rtsp_camera_drop_reconnects_and_recovers(server: Server, camera: Camera) -> None:
    with server.client() as client:
        source = create(client, camera.url, name="gate")
        assert source["options"]["on_end"] == "auto" and source["options"]["realtime"] is False
        with subscribe(server, source["id"], "png") as (ws, _):
            replies = frames_from(ws, 5)
            assert all((m["width"], m["height"]) == (160, 96) for m, _ in replies)
            assert not all(m["keyframe"] for m, _ in replies)  # streaming reuse over the live stream
            state = state_of(client, source["id"])
            assert state["state"] == "running" and state["source_fps"] == pytest.approx(10.0)
            before = state["frames"]

            camera.stop()
            dropped = until(ws, lambda m: m.get("state") == "reconnecting", "reconnecting state")[-1]
            assert dropped["error"], dropped
            assert wait_state(client, source["id"], {"reconnecting"})["reconnects"] >= 1

            camera.start()  # same port: the camera comes back
            until(ws, lambda m: m.get("state") == "running", "running state after the camera returned")
            after = [m for m, _ in frames_from(ws, 4)]
            assert after[0]["keyframe"] and after[0]["frame"] >= before  # no warp across the gap
            assert not all(m["keyframe"] for m in after)
        recovered = state_of(client, source["id"])
        assert recovered["state"] == "running" and recovered["frames"] > before + 3

        stopped = client.delete(f"/v1/sources/{source['id']}").json()
        assert stopped["state"] == "stopped" and source_threads(source["id"]) == []


def test_rtsp_unknown_path_fails_and_a_silent_camera_times_out(server: Server, camera: Camera) -> None:
    with server.client() as client:
        missing = create(client, f"rtsp://127.0.0.1:{camera.port}/nope")
        failed = wait_state(client, missing["id"], {"failed"})
        assert "404" in failed["error"], failed
        # a port that accepts TCP but never answers RTSP: the connect timeout, then reconnecting
        with _silent_listener() as port:
            silent = create(client, f"rtsp://127.0.0.1:{port}/cam")
            waiting = wait_state(client, silent["id"], {"reconnecting"})
            assert waiting["error"], waiting
            assert client.delete(f"/v1/sources/{silent['id']}").status_code == 200
        assert source_threads(silent["id"]) == []


class _silent_listener:  # noqa: N801 - used as a context manager
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_camera_drop_is_counted_in_metrics(server: Server, camera: Camera) -> None:
    with server.client() as client:
        source = create(client, camera.url)
        wait_state(client, source["id"], {"running"})
        camera.stop()
        wait_state(client, source["id"], {"reconnecting"})
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'vss_sources{state="reconnecting"} 1.0' in metrics
        assert "vss_source_reconnects_total" in metrics
        client.delete(f"/v1/sources/{source['id']}")
        assert 'vss_sources{state="reconnecting"} 0.0' in httpx.get(f"{server.url}/metrics").text
