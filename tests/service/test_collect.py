"""Who feeds the adaptation buffer (issue 10, defect 3 and build 2): only inputs that decoded completely,
de-duplicated, with provenance, under VSS_COLLECT and per-client rate limits; adapt jobs can be
restricted to authenticated clips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.buffer import ClipBuffer
from service.collect import PendingClips, RateLimiter
from service.settings import Settings
from service.video_io import VideoWriter

KEY = "collect-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def settings_for(root: Path, **overrides: Any) -> Settings:
    base = {"model_dir": root / "models", "buffer_dir": root / "buffer", "cache_dir": root / "cache",
            "job_dir": root / "jobs", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
            "device": "cpu", "flow": "none", "worker": "off", "buffer_clip_frames": 2, "buffer_clip_every": 2}
    return Settings(_env_file=None, **{**base, **overrides})


@pytest.fixture()
def make_client(tmp_path: Path, start_client: Callable[[Settings], TestClient]) -> Callable[..., TestClient]:
    return lambda **overrides: start_client(settings_for(tmp_path, **overrides))


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A valid 12-frame MP4, and one cut in half (its moov is at the front: it opens, decodes some frames,
    then fails: 415 only once decoding reached the cut)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 128, 3), dtype=np.uint8) for _ in range(12)]  # incompressible
    path = tmp_path_factory.mktemp("collect") / "v.mp4"
    with VideoWriter(path, 10.0, 128, 64, crf=23) as writer:
        for frame in frames:
            writer.write(frame)
    data = path.read_bytes()
    return {"valid": data, "cut": data[: len(data) // 2]}


def upload(client: TestClient, data: bytes, headers: dict[str, str] | None = None):
    return client.post("/v1/segment?format=json", files={"video": ("v.mp4", data)}, headers=headers or {})


def buffered(client: TestClient) -> dict[str, Any]:
    assert client.app.state.adaptation.collector.flush(30)
    return client.get("/v1/clips").json()


def test_rejected_uploads_do_not_feed_the_buffer_and_repeats_are_stored_once(make_client, videos) -> None:
    client = make_client()
    for _ in range(3):
        r = upload(client, videos["cut"])
        assert r.status_code == 415, r.text
        assert "after" in r.json()["error"]["message"]  # it failed mid-way, after frames were decoded
    assert buffered(client)["clips"] == 0
    for _ in range(3):
        assert upload(client, videos["valid"]).status_code == 200
    stats = buffered(client)
    assert stats["clips"] == 4  # clips of frames 0-1, 2-3, ... kept per upload (at most 4), stored once
    assert client.app.state.adaptation.collector.duplicates == 8


def test_provenance_is_recorded(make_client, videos) -> None:
    client = make_client(api_key=KEY)
    r = upload(client, videos["valid"], {**AUTH, "X-Request-ID": "req-prov-1"})
    assert r.status_code == 200
    stats = buffered(client)
    clip = stats["newest"]
    assert (clip["route"], clip["request_id"], clip["authenticated"]) == ("/v1/segment", "req-prov-1", True)
    assert clip["client"].startswith("key:") and KEY not in clip["client"]
    assert stats["authenticated_clips"] == stats["clips"] > 0


@pytest.mark.parametrize("mode, key, sends_key, collected", [
    ("auto", None, False, True),  # the open loopback demo: everybody's videos adapt the model
    ("auto", KEY, False, False),  # a deployed server: anonymous traffic never becomes training data
    ("auto", KEY, True, True),
    ("authenticated", KEY, False, False),
    ("all", KEY, False, True),
    ("off", None, False, False),
    ("off", KEY, True, False),
])
def test_collect_policy(make_client, videos, mode: str, key: str | None, sends_key: bool, collected: bool) -> None:
    client = make_client(collect=mode, api_key=key)
    assert upload(client, videos["valid"], AUTH if sends_key else None).status_code == 200
    with client.websocket_connect("/v1/stream", headers=AUTH if sends_key else {}) as ws:
        ws.send_json({"format": "rle"})
        assert ws.receive_json()["type"] == "ready"
        rng = np.random.default_rng(1)
        for _ in range(2):
            frame = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
            ws.send_bytes(b"RGB3" + (128).to_bytes(4, "little") + (64).to_bytes(4, "little") + frame.tobytes())
            assert ws.receive_json()["type"] == "frame"
            ws.receive_bytes()
    stats = buffered(client)
    assert (stats["clips"] > 0) == collected, stats
    if collected:
        assert set(stats["sources"]) == {"upload", "stream"}
    r = client.post("/v1/clips", files={"video": ("v.mp4", videos["valid"])}, headers=AUTH if key else {})
    assert r.status_code == (201 if mode != "off" else 403), r.text


def test_rate_limit_per_client(make_client, videos) -> None:
    client = make_client(collect="all", api_key=KEY, collect_rate_clips=3)
    assert upload(client, videos["valid"]).status_code == 200  # 4 clips sampled, the anonymous client may add 3
    assert buffered(client)["clips"] == 3
    assert 'vss_buffer_clips_refused_total{reason="rate_limited"} 1.0' in client.get("/metrics").text
    r = client.post("/v1/clips?clip_frames=4", files={"video": ("v.mp4", videos["valid"])}, headers=AUTH)
    assert r.status_code == 201 and len(r.json()["added"]) == 3  # another client (the key): its own budget
    r = client.post("/v1/clips?clip_frames=4", files={"video": ("v.mp4", videos["valid"])}, headers=AUTH)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert buffered(client)["clips"] == 6


def test_rate_limiter_window() -> None:
    now = [0.0]
    limiter = RateLimiter(2, 10.0, clock=lambda: now[0])
    assert limiter.take("a") and limiter.take("a") and not limiter.take("a")
    assert limiter.take("b", 2) and not limiter.take("b")
    assert limiter.retry_after("a") == 11
    now[0] = 10.0
    assert limiter.take("a", 2) and not limiter.take("a", 1)


def test_pending_clips_are_bounded_and_delivered_only_on_commit() -> None:
    got: list[list[np.ndarray]] = []
    pending = PendingClips(got.append, max_clips=2)
    for i in range(5):
        pending.add([np.full((2, 2, 3), i, np.uint8)] * 2)
    assert got == []
    assert pending.commit() == 2 and len(got) == 2
    pending.add([np.zeros((2, 2, 3), np.uint8)] * 2)
    pending.discard()
    assert pending.commit() == 0


def test_adapt_jobs_can_use_authenticated_clips_only(make_client, tmp_path: Path) -> None:
    from adaptation.synth import generate_clip
    from service.worker import Worker

    client = make_client(collect="all", api_key=KEY, adapt_min_clips=1, buffer_heldout_fraction=0.01)
    buffer: ClipBuffer = client.app.state.adaptation.buffer
    anonymous = {"route": "/v1/stream", "request_id": "r1", "authenticated": False, "client": "ip:x"}
    trusted = {"route": "/v1/clips", "request_id": "r2", "authenticated": True, "client": "key:y"}
    for seed in range(3):
        buffer.add(generate_clip("fog", frames=2, size=(64, 128), seed=seed).frames, "stream", provenance=anonymous)
    r = client.post("/v1/adapt", json={"method": "bn", "steps": 1, "authenticated_only": True}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_enough_clips"), r.text
    assert "authenticated" in r.json()["error"]["message"]
    mine = buffer.add(generate_clip("fog", frames=2, size=(64, 128), seed=9).frames, "api", provenance=trusted)
    r = client.post("/v1/adapt", json={"method": "bn", "steps": 1, "authenticated_only": True}, headers=AUTH)
    assert r.status_code == 202, r.text
    worker = Worker(settings_for(tmp_path, adapt_min_clips=1, buffer_heldout_fraction=0.01), buffer=buffer)
    _, _, summary = worker._load_clips((64, 128), authenticated_only=True)
    assert summary["ids"]["train"] + summary["ids"]["heldout"] == [mine.id]
    _, _, summary = worker._load_clips((64, 128))
    assert len(summary["ids"]["train"] + summary["ids"]["heldout"]) == 4
