"""Bad uploads get a precise 4xx with a JSON error body, and the server stays healthy afterwards."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import sandboxed_decode
from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.service.live import live_server


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = {"model_dir": tmp_path / "models", "job_dir": tmp_path / "jobs", "cache_dir": tmp_path / "cache",
            "buffer_dir": tmp_path / "buffer", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
            "device": "cpu", "flow": "dis-ultrafast", "buffer_enabled": False}
    return Settings(_env_file=None, **{**base, **overrides})


@pytest.fixture()
def make_client(tmp_path: Path, start_client: Callable[[Settings], TestClient]) -> Callable[..., TestClient]:
    return lambda **overrides: start_client(make_settings(tmp_path, **overrides))


def post(client: TestClient, data: bytes, query: str = "?format=json", field: str = "video", name: str = "v.mp4"):
    return client.post(f"/v1/segment{query}", files={field: (name, data, "application/octet-stream")})


def expect(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error["message"]


def test_malformed_uploads(make_client, synthetic_video, tmp_path: Path) -> None:
    client = make_client()
    video = synthetic_video.path.read_bytes()
    cases = {
        "truncated (first 300 bytes)": (video[:300], 415, "unsupported_media_type"),
        "truncated (half)": (video[: len(video) // 2], 415, "unsupported_media_type"),
        "random bytes": (os.urandom(20000), 415, "unsupported_media_type"),
        "empty file": (b"", 415, "unsupported_media_type"),
        "text file": (b"just some text, not a video\n" * 50, 415, "unsupported_media_type"),
    }
    for what, (data, status, code) in cases.items():
        message = expect(post(client, data), status, code)
        assert "v.mp4" in message or "empty" in message, (what, message)
        assert "upload.bin" not in message  # server-side paths never leak
    assert client.get("/healthz").json() == {"status": "ok"}
    assert post(client, video).status_code == 200  # and it still segments good videos


def test_bad_requests(make_client, synthetic_video) -> None:
    client = make_client()
    video = synthetic_video.path.read_bytes()
    assert "'file'" in expect(post(client, video, field="file"), 422, "missing_video")
    assert "format" in expect(post(client, video, "?format=gif"), 422, "invalid_request")
    assert "size" in expect(post(client, video, "?size=big"), 422, "invalid_request")
    assert "multiples of 8" in expect(post(client, video, "?size=60x100"), 422, "invalid_request")
    assert "stride" in expect(post(client, video, "?stride=0"), 422, "invalid_request")
    assert "max_frames" in expect(post(client, video, "?max_frames=0"), 422, "invalid_request")
    assert "over the limit" in expect(post(client, video, "?max_frames=100000"), 422, "invalid_request")
    not_multipart = client.post("/v1/segment", content=video, headers={"content-type": "video/mp4"})
    assert "multipart/form-data" in expect(not_multipart, 415, "unsupported_media_type")
    no_boundary = client.post("/v1/segment", content=b"x", headers={"content-type": "multipart/form-data"})
    expect(no_boundary, 400, "bad_request")
    broken = client.post("/v1/segment", content=b"garbage without any boundary",
                         headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert broken.status_code in (400, 422), broken.text
    assert client.get("/healthz").json() == {"status": "ok"}


def test_limits(make_client, synthetic_video) -> None:
    video = synthetic_video.path.read_bytes()  # 6 frames, 128x64, 10 fps (0.6 s)
    assert "limit" in expect(post(make_client(max_upload_bytes=len(video) // 2), video), 413, "payload_too_large")
    five = make_client(max_frames=5)
    message = expect(post(five, video), 422, "too_many_frames")
    assert "6 frames" in message and "limit is 5" in message
    assert post(five, video, "?format=json&max_frames=5").status_code == 200
    assert post(five, video, "?format=json&stride=2").status_code == 200
    message = expect(post(make_client(max_width=100, max_height=50), video), 422, "resolution_too_large")
    assert "128x64" in message
    assert "0.6 s" in expect(post(make_client(max_duration_s=0.3), video), 422, "video_too_long")


def test_decoder_runs_isolated_with_limits(synthetic_video, tmp_path: Path) -> None:
    info = sandboxed_decode.probe(synthetic_video.path)
    assert (info.width, info.height, info.frames) == (128, 64, 6)
    frames = list(sandboxed_decode.iter_frames(synthetic_video.path, max_frames=4, stride=1))
    assert len(frames) == 4 and frames[0].shape == (64, 128, 3)
    with pytest.raises(sandboxed_decode.VideoError):  # 64 MB of address space is not enough to decode anything
        sandboxed_decode.probe(synthetic_video.path, sandboxed_decode.DecodeLimits(memory_mb=64))
    with pytest.raises(sandboxed_decode.DecodeTimeout):
        sandboxed_decode.probe(synthetic_video.path, sandboxed_decode.DecodeLimits(timeout_s=0.001))
    with pytest.raises(sandboxed_decode.VideoError, match="over the limit"):
        list(sandboxed_decode.iter_frames(synthetic_video.path, limits=sandboxed_decode.DecodeLimits(max_pixels=100)))
    video = sandboxed_decode.VideoStream(synthetic_video.path)  # 6 frames of 24 kB: more than a pipe buffers
    video.probe()
    os.kill(video._proc.pid, signal.SIGSEGV)  # a decoder crash mid-stream
    video._proc.join(30)  # dead before the first read: the pipe holds less than the 6 frames
    with pytest.raises(sandboxed_decode.DecodeError):
        for _ in video:
            pass
    assert "SIGSEGV" in sandboxed_decode._crash_message("v.mp4", -11)


def read_status(conn: socket.socket) -> tuple[int, bytes]:
    conn.settimeout(20)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_oversized_upload_is_refused_before_the_body_is_read(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    app = create_app(make_settings(tmp_path, max_upload_bytes=100_000))
    head = b"--b\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n"
    with live_server(app, scheme=None) as host:  # serves once the model is loaded
        port = int(host.rpartition(":")[2])
        # A declared length over the limit: answered at once, not one body byte is sent.
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 10000000000\r\n\r\n")
            status, raw = read_status(conn)
            assert status == 413 and b"payload_too_large" in raw
        # Chunked, no length: refused once the streamed part passes the limit, with the body unfinished.
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = head + b"\0" * 50_000
            sent = 0
            try:
                for _ in range(8):  # 400 kB, never terminated
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    chunk = b"\0" * 50_000
            except OSError:
                pass  # the server may already have answered and closed
            status, raw = read_status(conn)
            assert status == 413 and b"payload_too_large" in raw
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_status(conn)[0] == 200
