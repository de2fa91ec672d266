"""``POST /v1/segment``: synchronous zip/mp4/json results, jobs (202 -> poll -> result), options, fairness."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.segment_jobs import FairLock, JobStore
from service.settings import Settings
from service.video_io import read_frames
from tests.waiting import wait_until


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = {"model_dir": tmp_path / "models", "buffer_dir": tmp_path / "buffer", "cache_dir": tmp_path / "cache",
            "job_dir": tmp_path / "jobs", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
            "engine": "torch", "device": "cpu", "flow": "dis-ultrafast", "buffer_enabled": False}
    return Settings(_env_file=None, **{**base, **overrides})


@pytest.fixture()
def make_client(tmp_path: Path, start_client: Callable[[Settings], TestClient]) -> Callable[..., TestClient]:
    return lambda **overrides: start_client(make_settings(tmp_path, **overrides))


def upload(client: TestClient, path: Path, query: str = "", name: str = "clip.mp4"):
    return client.post(f"/v1/segment{query}", files={"video": (name, path.read_bytes(), "video/mp4")})


def test_sync_zip_has_label_maps_and_manifest(make_client, synthetic_video) -> None:
    client = make_client()
    r = upload(client, synthetic_video.path, "?format=zip")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == 'attachment; filename="clip-segmentation.zip"'
    assert r.headers["x-model-version"] == "v0001" and r.headers["x-frames"] == "6"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        names = sorted(z.namelist())
        assert names == [f"{i:06d}.png" for i in range(6)] + ["manifest.json"]
        manifest = json.loads(z.read("manifest.json"))
        labels = np.asarray(Image.open(io.BytesIO(z.read("000000.png"))))
    assert manifest["frames"] == 6 and manifest["model_version"] == "v0001" and len(manifest["classes"]) == 7
    assert labels.shape == (64, 128) and labels.max() < 7


def test_sync_mp4_is_a_playable_overlay(make_client, synthetic_video, tmp_path: Path) -> None:
    client = make_client()
    r = upload(client, synthetic_video.path, "?format=mp4&stride=2")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.headers["x-frames"] == "3"
    out = tmp_path / "out.mp4"
    out.write_bytes(r.content)
    frames = list(read_frames(out))
    assert len(frames) == 3 and frames[0].shape == (64, 128, 3)


def test_sync_json_statistics_and_options(make_client, synthetic_video) -> None:
    client = make_client()
    r = upload(client, synthetic_video.path, "?format=json&max_frames=4&size=64x96&collect=false")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["summary"]["frames"] == 4 and len(doc["frames"]) == 4
    assert doc["summary"]["input_size"] == [64, 96]
    shares = doc["frames"][0]["class_fractions"]
    assert set(shares) == set(doc["summary"]["classes"]) and abs(sum(shares.values()) - 1.0) < 1e-3
    assert client.post("/segment?format=json", files={"video": ("a.mp4", synthetic_video.path.read_bytes())}
                       ).status_code == 200  # the unversioned alias
    metrics = client.get("/metrics").text
    assert 'vss_frames_segmented_total{source="upload"} 10.0' in metrics


def test_long_video_runs_as_a_job(make_client, synthetic_video) -> None:
    client = make_client(job_frame_threshold=2)
    r = upload(client, synthetic_video.path, "?format=json")
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["frames_total"] == 6
    seen: list[dict] = []

    def ended() -> bool:
        seen.append(status := client.get(r.headers["location"]).json())
        if status["state"] in ("done", "failed"):
            return True
        early = client.get(f"{r.headers['location']}/result")  # not done yet: 409 (or 200 if it just ended)
        assert early.status_code in (200, 409), early.text
        return False
    wait_until(ended, 60, "the upload job to end")
    status = seen[-1]
    assert all(0.0 <= s["progress"] <= 1.0 for s in seen)
    assert status["state"] == "done", status
    assert status["progress"] == 1.0 and status["eta_s"] == 0.0 and status["summary"]["frames"] == 6
    result = client.get(f"/v1/jobs/{job['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "application/json"
    assert len(result.json()["frames"]) == 6
    missing = client.get("/v1/jobs/0123456789abcdef")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs/0123456789abcdef/result").status_code == 404


def test_job_result_is_409_until_done(make_client) -> None:
    client = make_client()
    store = client.app.state.data_plane.jobs
    release = threading.Event()
    job = store.submit(store.workdir(), 10, "json", lambda j: release.wait(10))  # ends without a result
    r = client.get(f"/v1/jobs/{job.id}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_done"
    assert client.get(f"/v1/jobs/{job.id}").json()["state"] in ("queued", "running")
    release.set()
    wait_until(lambda: client.get(f"/v1/jobs/{job.id}").json()["state"] == "failed", 10, "the job to fail", 0.02)
    failed = client.get(f"/v1/jobs/{job.id}/result")
    assert failed.status_code == 409 and failed.json()["error"]["code"] == "job_failed"


def test_job_store_ttl_removes_finished_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=5)
    workdir = store.workdir()
    (workdir / "result.json").write_text("{}")
    job = store.submit(workdir, 1, "json", lambda j: store.finish(j, workdir / "result.json", "application/json",
                                                                      "r.json"))
    wait_until(lambda: job.state == "done", 10, "the job to finish", 0.01)
    assert store.sweep(now=time.time()) == 0 and store.get(job.id) is job
    assert store.sweep(now=time.time() + 6) == 1
    assert store.get(job.id) is None and not workdir.exists()
    store.close()
    assert not store.root.exists()


def test_closing_the_store_stops_a_running_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=60)
    started = threading.Event()

    def endless(job) -> None:
        n = 0
        while True:
            n += 1
            store.progress(job, n)
            started.set()
            time.sleep(0.01)

    job = store.submit(store.workdir(), 10**6, "json", endless)
    assert started.wait(10)
    store.close()  # returns once the job noticed, not after 10**6 frames
    assert job.state == "failed" and "shutting down" in job.error["message"]
    assert not store.root.exists()


def test_fair_lock_serves_waiters_in_arrival_order() -> None:
    lock, order = FairLock(), []
    lock.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        # thread i is queued before the next one starts
        wait_until(lambda i=i: len(lock._waiters) == i + 1, 10, f"thread {i} to queue", 0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        lock.release()


def test_concurrent_requests_share_the_engine(make_client, synthetic_video) -> None:
    client = make_client()
    results: list[int] = []

    def one() -> None:
        results.append(upload(client, synthetic_video.path, "?format=json").status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200, 200]


def test_overlapped_loop_matches_the_plain_stream_segmenter(tiny_checkpoint, synthetic_video, tmp_path) -> None:
    from models.checkpoint import load_checkpoint
    from models.flow import DISFlow
    from service.engine import TorchEngine
    from service.video_segmenter import segment_frames
    from service.stream_segmenter import StreamSegmenter
    from service.video_io import VideoInfo

    model, meta = load_checkpoint(tiny_checkpoint)
    engine = TorchEngine(model, meta, "t")
    frames = list(synthetic_video.frames)
    info = VideoInfo(128, 64, 10.0, len(frames), 0.6, 0, "h264")
    summary = segment_frames(engine, DISFlow("ultrafast"), iter(frames), info, tmp_path / "r.json", "json")
    overlapped = [f["class_fractions"] for f in json.loads((tmp_path / "r.json").read_text())["frames"]]
    plain = StreamSegmenter(engine, DISFlow("ultrafast"))
    assert overlapped == [plain.step(f).class_fractions for f in frames]
    assert summary["frames"] == len(frames) and summary["flow"] == "dis-ultrafast"


def test_writer_thread_reports_every_frame_and_surfaces_its_errors(tiny_checkpoint, synthetic_video,
                                                                   tmp_path) -> None:
    from models.checkpoint import load_checkpoint
    from models.flow import DISFlow
    from service.engine import TorchEngine
    from service.video_segmenter import segment_frames
    from service.video_io import VideoInfo

    model, meta = load_checkpoint(tiny_checkpoint)
    engine = TorchEngine(model, meta, "t")
    frames = list(synthetic_video.frames)
    info = VideoInfo(128, 64, 10.0, len(frames), 0.6, 0, "h264")
    seen: list[tuple[int, float]] = []
    summary = segment_frames(engine, DISFlow("ultrafast"), iter(frames), info, tmp_path / "r.zip", "zip",
                             on_frame=lambda frame, result: seen.append((result.index, result.latency_ms)))
    assert [i for i, _ in seen] == list(range(len(frames))) and all(ms > 0 for _, ms in seen)
    assert abs(sum(summary["class_fractions"].values()) - 1.0) < 1e-3

    def broken(frame, result) -> None:
        if result.index == 2:
            raise RuntimeError("hook failed on frame 2")

    out = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError, match="frame 2"):
        segment_frames(engine, DISFlow("ultrafast"), iter(frames), info, out, "mp4", on_frame=broken)
    assert not [p.name for p in tmp_path.iterdir() if "broken.mp4" in p.name]  # the sink was aborted, no temp
