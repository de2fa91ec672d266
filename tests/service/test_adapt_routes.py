"""`/v1/adapt` and `/v1/clips` through the app: validation, auth, one job at a time, cancel, clip uploads,
the collect hook, a killed worker process, and a restarted server resuming on the last ACTIVE version."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.waiting import wait_until

API_KEY = "adapt-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SIZE = (64, 128)


def settings_for(root: Path, **overrides: Any) -> Settings:
    base = {"model_dir": root / "models", "buffer_dir": root / "buffer", "cache_dir": root / "cache",
            "job_dir": root / "jobs", "demo_model": None, "api_key": API_KEY, "registry_poll_ms": 50,
            "intra_op_threads": 1, "device": "cpu", "flow": "dis-ultrafast", "worker": "off",
            "adapt_min_clips": 2, "buffer_heldout_fraction": 0.3}
    return Settings(_env_file=None, **{**base, **overrides})


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    return wait_until(check, timeout, what)


@pytest.fixture()
def make_client(tmp_path: Path, start_client: Callable[[Settings], TestClient]) -> Callable[..., TestClient]:
    return lambda **overrides: start_client(settings_for(tmp_path, **overrides))


def png_frames(n: int, seed: int = 0, style: str = "fog") -> list[tuple[str, tuple[str, bytes, str]]]:
    from adaptation.synth import generate_clip

    clip = generate_clip(style, frames=n, size=SIZE, seed=seed)
    return [("images", (f"{i}.png", cv2.imencode(".png", f[..., ::-1])[1].tobytes(), "image/png"))
            for i, f in enumerate(clip.frames)]


def fill_buffer(client: TestClient, train: int = 2, heldout: int = 1) -> dict[str, Any]:
    """POST clips until the buffer has enough training and held-out ones (the split is by a hash of the frames)."""
    for seed in range(100):
        stats = client.get("/v1/clips").json()
        if stats["train_clips"] >= train and stats["heldout_clips"] >= heldout:
            return stats
        r = client.post("/v1/clips?clip_frames=3", files=png_frames(3, seed), headers=AUTH)
        assert r.status_code == 201, r.text
    raise AssertionError("could not fill the buffer")


def test_start_validates_the_request(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    fill_buffer(client)
    cases = [({"method": "nope"}, "unknown_method"), ({"method": "tent", "steps": 0}, "invalid_request"),
             ({"steps": 10**6}, "invalid_request"), ({"lr": -1}, "invalid_request"),
             ({"color": "red"}, "invalid_request"), ({"options": {"no_such_option": 1}}, "invalid_options"),
             ({"time_budget_s": 0}, "invalid_request")]
    for body, code in cases:
        r = client.post("/v1/adapt", json=body, headers=AUTH)
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), (body, r.text)
    assert client.get("/v1/adapt").json()["jobs"] == []


def test_mutating_routes_need_the_api_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.post("/v1/adapt", json={}).status_code == 401
    assert client.post("/v1/adapt", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/v1/clips", files=png_frames(2)).status_code == 401
    assert client.delete("/v1/clips").status_code == 401
    assert client.get("/v1/adapt").status_code == 200 and client.get("/v1/clips").status_code == 200


def test_too_few_clips_is_a_conflict(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    r = client.post("/v1/adapt", json={"method": "bn"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_enough_clips"


def test_job_lifecycle_one_at_a_time_and_cancel(make_client: Callable[..., TestClient]) -> None:
    client = make_client()  # no worker: the job stays queued
    fill_buffer(client)
    r = client.post("/v1/adapt", json={"method": "tent", "steps": 20, "lr": 1e-4}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/adapt/{job['id']}"
    assert job["state"] == "queued" and job["request"]["method"] == "tent" and job["request"]["lr"] == 1e-4
    again = client.post("/adapt", json={"method": "bn"}, headers=AUTH)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_running"
    assert again.headers["location"] == f"/v1/adapt/{job['id']}"
    listing = client.get("/v1/adapt").json()
    assert [j["id"] for j in listing["jobs"]] == [job["id"]] and listing["worker"]["mode"] == "off"
    status = client.get(r.headers["location"]).json()
    assert status["state"] == "queued" and status["progress"] == 0.0 and status["losses"] == []
    cancelled = client.post(f"/v1/adapt/{job['id']}/cancel", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post(f"/v1/adapt/{job['id']}/cancel", headers=AUTH).status_code == 409
    assert client.get(f"/v1/adapt/{'0' * 32}").status_code == 404
    assert client.get("/v1/adapt/..%2F..%2Fetc").status_code in (404, 422)
    assert client.post("/v1/adapt", json={"method": "bn"}, headers=AUTH).status_code == 202  # slot free again


def test_posting_clips_as_video_and_images(make_client: Callable[..., TestClient], synthetic_video: Any) -> None:
    client = make_client()
    with open(synthetic_video.path, "rb") as f:
        r = client.post("/v1/clips?clip_frames=4", files={"video": ("clip.mp4", f, "video/mp4")}, headers=AUTH)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["frames"] == 6 and [c["frames"] for c in body["added"]] == [4, 2]
    assert all((c["height"], c["width"], c["source"]) == (64, 128, "api") for c in body["added"])
    r = client.post("/v1/clips", files=png_frames(5), headers=AUTH)
    assert r.status_code == 201 and [c["frames"] for c in r.json()["added"]] == [5]
    stats = client.get("/v1/clips").json()
    assert stats["clips"] == 3 and stats["frames"] == 11 and stats["newest"]["frames"] == 5
    assert stats["train_clips"] + stats["heldout_clips"] == 3
    bad = [client.post("/v1/clips", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}),
           client.post("/v1/clips", files={"other": ("a.txt", b"abc")}, headers=AUTH),
           client.post("/v1/clips", files=png_frames(1), headers=AUTH),
           client.post("/v1/clips", files=[("images", ("a.png", os.urandom(64), "image/png"))] * 2, headers=AUTH),
           client.post("/v1/clips", files={"video": ("v.mp4", os.urandom(4096), "video/mp4")}, headers=AUTH)]
    assert [b.status_code for b in bad] == [415, 422, 422, 415, 415], [b.text for b in bad]
    assert client.get("/v1/clips").json()["clips"] == 3  # nothing half-added
    assert client.delete("/v1/clips", headers=AUTH).json() == {"removed": 3}


def test_uploads_feed_the_buffer_unless_collect_is_false(make_client: Callable[..., TestClient],
                                                         synthetic_video: Any) -> None:
    client = make_client(buffer_clip_frames=3, buffer_clip_every=3)
    data = synthetic_video.path.read_bytes()
    r = client.post("/v1/segment?format=json&collect=false", files={"video": ("a.mp4", data)})
    assert r.status_code == 200
    plane = client.app.state.adaptation
    assert plane.collector.flush(30) and client.get("/v1/clips").json()["clips"] == 0
    # with a key set, only authenticated clients feed the buffer (VSS_COLLECT=auto): send the key
    assert client.post("/v1/segment?format=json", files={"video": ("a.mp4", data)}, headers=AUTH).status_code == 200
    assert plane.collector.flush(30)
    stats = client.get("/v1/clips").json()
    assert stats["clips"] == 2 and stats["sources"] == {"upload": 2} and stats["oldest"]["frames"] == 3
    assert stats["oldest"]["authenticated"] and stats["oldest"]["route"] == "/v1/segment"
    assert 'vss_buffer_clips_added_total{source="upload"} 2.0' in client.get("/metrics").text


def test_killed_worker_fails_its_job_and_is_restarted(make_client: Callable[..., TestClient]) -> None:
    client = make_client(worker="spawn", adapt_heartbeat_s=0.2)
    fill_buffer(client)
    r = client.post("/v1/adapt", json={"method": "tent", "steps": 5000}, headers=AUTH)
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    supervisor = client.app.state.adaptation.supervisor
    wait_for(lambda: client.get(location).json()["stage"] == "train", 120, "the worker to start training")
    pid = supervisor.pid
    job_id = location.rsplit("/", 1)[1]
    assert pid is not None and client.app.state.adaptation.jobs.get(job_id)["worker"]["pid"] == pid
    assert "worker" not in client.get(location).json()  # the answer never shows the worker's pid or host
    os.kill(pid, signal.SIGKILL)
    job = wait_for(lambda: (j := client.get(location).json())["state"] == "failed" and j, 30, "the job to fail")
    assert job["error"]["code"] == "worker_lost" and str(pid) not in job["error"]["message"]
    wait_for(lambda: supervisor.pid not in (None, pid), 30, "a new worker")
    assert supervisor.restarts == 1
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert client.get("/v1/models/active").json()["version"] == "v0001"
    listing = client.get("/v1/adapt").json()
    assert "pid" not in listing["worker"] and listing["worker"]["restarts"] == 1


def test_restarted_server_resumes_on_the_last_active_version(make_client: Callable[..., TestClient],
                                                             tmp_path: Path) -> None:
    from adaptation.gate import GateThresholds
    from service.worker import Worker

    client = make_client()
    fill_buffer(client)
    job = client.post("/v1/adapt", json={"method": "bn", "steps": 1}, headers=AUTH).json()
    lenient = GateThresholds(vanish_share=1.0, min_entropy_ratio=0.0, max_class_tv=1.0, tc_tolerance=100.0,
                             min_agreement=0.0)
    worker = Worker(settings_for(tmp_path), thresholds=lenient)  # an external worker sharing the directories
    assert worker.poll_once()
    assert client.get(f"/v1/adapt/{job['id']}").json()["version"] == "v0002"
    wait_for(lambda: client.get("/v1/models/active").json()["version"] == "v0002", 30, "the hot swap")
    client.__exit__(None, None, None)
    restarted = make_client()
    assert restarted.get("/v1/models/active").json()["version"] == "v0002"
    assert restarted.get(f"/v1/adapt/{job['id']}").json()["state"] == "published"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (CI: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def test_web_panel_starts_a_job_and_shows_the_result(browser: Any, tmp_path: Path, tiny_checkpoint: Path) -> None:
    import socket
    import threading

    import uvicorn

    from adaptation.gate import GateThresholds
    from adaptation.synth import generate_clip
    from service.worker import Worker

    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    app = create_app(settings_for(tmp_path))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started and app.state.engine_manager.ready, 30, "the server")
        buffer = app.state.adaptation.buffer
        for seed in range(100):  # enough training and held-out clips (the split is by a hash of the frames)
            if buffer.stats()["train_clips"] >= 2 and buffer.stats()["heldout_clips"] >= 1:
                break
            buffer.add(generate_clip("fog", frames=3, size=SIZE, seed=seed).frames, "test")
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        page.wait_for_function("!document.getElementById('adapt-panel').hidden")
        page.wait_for_function("document.getElementById('adapt-buffer').textContent.includes('for training')")
        page.select_option("#adapt-method", "bn")
        page.fill("#adapt-steps", "1")
        page.fill("#adapt-key", API_KEY)
        page.click("#adapt-start")
        page.wait_for_function("document.getElementById('adapt-status').textContent.includes('queued')")
        lenient = GateThresholds(vanish_share=1.0, min_entropy_ratio=0.0, max_class_tv=1.0, tc_tolerance=100.0,
                                 min_agreement=0.0)
        assert Worker(settings_for(tmp_path), thresholds=lenient).poll_once()
        page.wait_for_function("document.getElementById('adapt-status').textContent.includes('published v0002')",
                               timeout=30_000)
        assert page.locator("#adapt-gate").inner_text() == "passed"
        assert page.locator("#adapt-version").inner_text().startswith("v0002")
        if os.environ.get("VSS_TEST_SCREENSHOTS"):
            page.screenshot(path=str(Path(os.environ["VSS_TEST_SCREENSHOTS"]) / "adapt.png"), full_page=True)
        page.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
