"""Helpers of the sources tests: a live vss server, a loopback HTTP file server, clips, subscribers."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import httpx
import numpy as np
from websockets.sync.client import ClientConnection, connect

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from service.stream_codec import decode_labels
from service.video_io import VideoWriter
from tests.service.live import live_server
from tests.waiting import wait_until

FRAME_KEYS = {"type", "frame", "model_version", "latency_ms", "compute_ms", "dropped", "class_fractions",
              "keyframe", "width", "height", "format"}


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    app: Any
    root: Path

    @property
    def ws(self) -> str:
        return "ws" + self.url[len("http"):]

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)


@contextmanager
def vss_server(root: Path, checkpoint: Path, **overrides: Any) -> Iterator[Server]:
    """A live server over a registry holding ``checkpoint``, with sources allowed on loopback."""
    registry = ModelRegistry(root / "models")
    if not registry.versions():
        registry.import_dir(checkpoint, activate=True)
    (root / "files").mkdir(exist_ok=True)
    settings = Settings(_env_file=None, **{
        "model_dir": root / "models", "job_dir": root / "jobs", "cache_dir": root / "cache",
        "buffer_dir": root / "buffer", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
        "device": "cpu", "flow": "dis-ultrafast", "buffer_enabled": False, "worker": "off",
        "sources_allowed_hosts": ["127.0.0.0/8"], "sources_file_dir": root / "files",
        "sources_output_dir": root / "out", "sources_reconnect_min_s": 0.05, "sources_reconnect_max_s": 0.2,
        "sources_connect_timeout_s": 5.0, "sources_read_timeout_s": 5.0, **overrides})
    app = create_app(settings)
    with live_server(app, "http") as url:
        yield Server(url, app, root)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus ``/redirect?to=URL`` (a 302 anywhere) for the redirect test."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/mjpeg":  # a camera's MJPEG stream: 20 JPEG frames at 20 fps, then the camera hangs up
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for i in range(20):
                jpeg = cv2.imencode(".jpg", np.full((48, 80, 3), i * 10, np.uint8))[1].tobytes()
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                 % (len(jpeg), jpeg))
                self.wfile.flush()
                time.sleep(0.05)
            return
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect?to="):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.hosts.append(self.headers.get("Host"))  # type: ignore[attr-defined]
        if self.path.startswith("/ranged/"):
            self._ranged(Path(self.directory) / self.path[len("/ranged/"):])
            return
        super().do_GET()

    def _ranged(self, path: Path) -> None:
        """Serve a file with byte ranges (``Range: bytes=N-``), as nginx does; http.server has none."""
        data = path.read_bytes()
        start = int(self.headers.get("Range", "bytes=0-")[len("bytes="):].split("-")[0] or 0)
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


@contextmanager
def file_server(directory: Path, tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` over HTTP (HTTPS with ``tls``) on loopback; yields (base URL, the Host headers)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(directory)))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.hosts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scheme = "https" if tls is not None else "http"
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", server.hosts  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def clip_frames(frames: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` frames played back and forth from ``frames`` (a longer clip from the 6-frame fixture)."""
    cycle = list(frames) + list(frames[-2:0:-1])
    return [cycle[i % len(cycle)] for i in range(n)]


def write_mp4(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    h, w = frames[0].shape[:2]
    with VideoWriter(path, fps, w, h, crf=18) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def write_hls(directory: Path, frames: list[np.ndarray], fps: int = 10, segment_s: float = 1.0) -> Path:
    """An HLS VOD rendition (MPEG-TS segments + index.m3u8) written by FFmpeg's HLS muxer."""
    directory.mkdir(parents=True, exist_ok=True)
    playlist = directory / "index.m3u8"
    out = av.open(str(playlist), "w", format="hls", options={
        "hls_time": str(segment_s), "hls_playlist_type": "vod", "hls_segment_filename": str(directory / "s%d.ts")})
    stream = out.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt, stream.options = "yuv420p", {"g": str(fps)}
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return playlist


def decoded_frames(url_or_path: str, **options: Any) -> int:
    with av.open(url_or_path, **options) as container:
        return sum(1 for _ in container.decode(video=0))


def state_of(client: httpx.Client, source_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/sources/{source_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_state(client: httpx.Client, source_id: str, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
    return wait_until(lambda: (s := state_of(client, source_id))["state"] in states and s, timeout,
                      f"source {source_id} to reach {sorted(states)}")


def create(client: httpx.Client, url: str, **options: Any) -> dict[str, Any]:
    response = client.post("/v1/sources", json={"url": url, **options})
    assert response.status_code == 201, response.text
    return response.json()


@contextmanager
def subscribe(server: Server, source_id: str, fmt: str = "png",
              headers: dict[str, str] | None = None) -> Iterator[tuple[ClientConnection, dict]]:
    with connect(f"{server.ws}/v1/sources/{source_id}/results?format={fmt}", max_size=None,
                 additional_headers=headers) as ws:
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready", ready
        yield ws, ready


def next_message(ws: ClientConnection, timeout: float = 30.0) -> tuple[dict, Any]:
    """The next message: a frame (meta, labels) or a state message (meta, None)."""
    meta = json.loads(ws.recv(timeout=timeout))
    if meta["type"] != "frame":
        return meta, None
    return meta, decode_labels(ws.recv(timeout=timeout), meta["format"])


def frames_from(ws: ClientConnection, n: int, timeout: float = 60.0) -> list[tuple[dict, np.ndarray]]:
    """The next ``n`` frame replies (state messages in between are skipped)."""
    out: list[tuple[dict, np.ndarray]] = []
    while len(out) < n:
        meta, labels = next_message(ws, timeout)
        if labels is not None:
            out.append((meta, labels))
    return out


def source_threads(source_id: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"vss-source-{source_id}")]


def copy_into(src: Path, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, directory / name))
