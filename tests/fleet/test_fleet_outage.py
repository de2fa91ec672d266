"""A replica on an S3 registry rides out a store outage and follows activations once the store is back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.storage import S3Store
from service.store_buffer import StoreClipBuffer
from service.store_registry import StoreRegistry
from service.video_io import VideoWriter
from tests.s3server import SeaweedServer
from tests.waiting import wait_until


def store_errors(client: TestClient) -> float:
    text = client.get("/metrics").text
    return sum(float(v) for v in re.findall(r'^vss_store_errors_total\{op="[a-z]+"\} (\S+)$', text, re.M))


def serving(client: TestClient) -> str | None:
    r = client.get("/readyz")
    return r.json()["model_version"] if r.status_code == 200 else None


def test_store_outage_keeps_serving_and_resumes(weed: str, tmp_path: Path, tiny_checkpoint: Path,
                                                synthetic_video, monkeypatch: pytest.MonkeyPatch) -> None:
    server = SeaweedServer(tmp_path / "s3", weed).start()  # its own server: this test stops it
    try:
        server.create_bucket("vss-test")
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = "s3://vss-test/models"
        publisher = StoreRegistry(S3Store(url), tmp_path / "cache-publisher")
        publisher.import_dir(tiny_checkpoint, activate=True)
        publisher.import_dir(tiny_checkpoint)
        settings = Settings(_env_file=None, model_dir=url, cache_dir=tmp_path / "cache",
                            buffer_dir="s3://vss-test/buffer", job_dir=tmp_path / "jobs", demo_model=None,
                            registry_poll_ms=50, intra_op_threads=1, device="cpu", flow="dis-ultrafast",
                            buffer_clip_frames=2, buffer_clip_every=2, worker="off")
        clips = StoreClipBuffer(S3Store("s3://vss-test/buffer"))
        video = {"video": ("clip.mp4", synthetic_video.path.read_bytes(), "video/mp4")}
        with TestClient(create_app(settings)) as client:
            wait_until(lambda: serving(client) == "v0001", 60, "the replica to serve v0001")
            collector = client.app.state.adaptation.collector
            assert client.post("/v1/segment?format=json", files=video).status_code == 200
            assert collector.flush(30) and len(clips.clips()) == collector.added > 0  # traffic reaches the buffer
            before = store_errors(client)
            server.stop()
            wait_until(lambda: store_errors(client) > before, 30, "/metrics to count store errors")
            assert serving(client) == "v0001"  # /readyz stays ready on the model it has
            failed = collector.failed
            r = client.post("/v1/segment?format=json", files=video)  # collection pauses, the client sees nothing
            assert r.status_code == 200 and r.headers["x-model-version"] == "v0001", r.text
            assert collector.flush(30) and collector.failed > failed
            assert client.get("/v1/models/active").json()["version"] == "v0001"
            assert client.get("/v1/models").status_code == 503  # listing needs the store: a clear 503
            assert client.get("/v1/models").json()["error"]["code"] == "store_unavailable"

            server.start()  # same ports, same data directory
            publisher.activate("v0002")
            wait_until(lambda: serving(client) == "v0002", 30, "the activation to propagate after the outage")
            added = collector.added
            other = tmp_path / "mirrored.mp4"  # new content: the buffer stores the same clip only once
            with VideoWriter(other, synthetic_video.fps, synthetic_video.frames.shape[2],
                             synthetic_video.frames.shape[1], crf=18) as writer:
                for frame in synthetic_video.frames:
                    writer.write(frame[:, ::-1].copy())
            video = {"video": ("mirrored.mp4", other.read_bytes(), "video/mp4")}
            assert client.post("/v1/segment?format=json", files=video).status_code == 200
            assert collector.flush(30) and collector.added > added  # collection resumed
    finally:
        server.stop()
