"""The web page in headless Chromium (playwright, system ``chromium``) against a real uvicorn on loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.service.live import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = os.environ.get("VSS_TEST_SCREENSHOTS")  # set to keep the screenshots somewhere


def make_app(root: Path, checkpoint: Path, **overrides: object) -> FastAPI:
    ModelRegistry(root / "models").import_dir(checkpoint, activate=True)
    return create_app(Settings(_env_file=None, **{
        "model_dir": root / "models", "job_dir": root / "jobs", "cache_dir": root / "cache",
        "buffer_dir": root / "buffer", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
        "device": "cpu", "flow": "dis-ultrafast", "buffer_enabled": False, **overrides}))




@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (CI: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                          "--autoplay-policy=no-user-gesture-required",
                                          "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[str]:
    """One live server for the browser tests; uploads of more than 4 frames run as jobs."""
    with live_server(make_app(tmp_path_factory.mktemp("web"), tiny_checkpoint, job_frame_threshold=4)) as url:
        yield url


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory, synthetic_video) -> Path:
    """The first 4 frames of the synthetic clip: answered synchronously by ``site``."""
    from service.video import VideoWriter

    path = tmp_path_factory.mktemp("short") / "short.mp4"
    with VideoWriter(path, synthetic_video.fps, 128, 64, crf=18) as writer:
        for frame in synthetic_video.frames[:4]:
            writer.write(frame)
    return path


def test_page_and_static_files_are_served(site: str) -> None:
    page = httpx.get(f"{site}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="video-file"', 'id="live-canvas"', 'id="legend"', 'id="models"', 'id="adapt-panel"'):
        assert needle in page.text
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")  # no CDN in <head>
    assert httpx.get(f"{site}/static/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{site}/static/style.css").status_code == 200
    assert httpx.get(f"{site}/static/secret.txt").status_code == 404
    assert httpx.get(f"{site}/static/%2E%2E%2Fsettings.py").status_code == 404
    classes = httpx.get(f"{site}/v1/classes").json()
    assert classes["model_version"] == "v0001" and len(classes["classes"]) == len(classes["palette"]) == 7


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = Path(SCREENSHOT_DIR or tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def test_upload_shows_the_overlay_video_and_legend(browser, site: str, short_video: Path, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(site)
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"not a video at all\n" * 100)
    page.set_input_files("#video-file", str(bad))
    page.click("#upload-button")
    page.wait_for_selector("#upload-status.error")  # errors are shown, and the page stays usable
    assert "unsupported_media_type" in page.locator("#upload-status").inner_text()
    page.wait_for_selector("#legend li")
    assert page.locator("#legend li").count() == 7
    page.wait_for_selector("#models li.active")
    assert page.locator("#models li.active").inner_text().startswith("v0001")
    has_adapt = "/v1/adapt" in page.evaluate("fetch('/openapi.json').then(r => r.json())")["paths"]
    page.wait_for_function(f"document.getElementById('adapt-panel').hidden === {str(not has_adapt).lower()}")
    page.set_input_files("#video-file", str(short_video))
    page.select_option("#upload-format", "mp4")
    page.click("#upload-button")  # 4 frames: the result comes back with the response
    page.wait_for_function("document.getElementById('result-video').readyState >= 2", timeout=60_000)
    size = page.evaluate("[document.getElementById('result-video').videoWidth, "
                         "document.getElementById('result-video').videoHeight]")
    assert size == [128, 64]
    assert "segmented" in page.locator("#upload-status").inner_text()
    _shot(page, tmp_path, "upload.png")
    page.close()


def test_job_progress_and_live_stream_of_a_local_file(browser, site: str, synthetic_video, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(site)
    page.set_input_files("#video-file", str(synthetic_video.path))
    page.select_option("#upload-format", "json")
    page.click("#upload-button")  # 6 frames > 4: a job, polled by the page
    page.wait_for_selector("#result-stats tr", timeout=60_000)
    assert page.locator("#result-stats tr").count() == 7
    assert page.locator("#upload-progress .bar").evaluate("e => e.style.width") == "100%"

    page.set_input_files("#stream-file", str(synthetic_video.path))
    page.wait_for_function("document.getElementById('stat-version').textContent.startsWith('v0001')",
                           timeout=60_000)
    page.wait_for_function("parseFloat(document.getElementById('stat-fps').textContent) > 0", timeout=60_000)
    painted = page.evaluate("""() => {
        const c = document.getElementById('live-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lit = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 0) lit++;
        return [c.width, c.height, lit];
    }""")
    assert painted[:2] == [128, 64] and painted[2] > 0.5 * 128 * 64
    _shot(page, tmp_path, "stream.png")
    page.click("#stop-button")
    page.close()


def test_webcam_stream_draws_a_live_overlay(browser, site: str) -> None:
    context = browser.new_context(permissions=["camera"])
    page = context.new_page()
    page.goto(site)
    page.click("#webcam-button")  # Chromium's fake camera stands in for getUserMedia
    page.wait_for_function("parseFloat(document.getElementById('stat-fps').textContent) > 0", timeout=60_000)
    assert page.locator("#stat-version").inner_text().startswith("v0001")
    assert int(page.locator("#stat-dropped").inner_text()) >= 0
    width = page.evaluate("document.getElementById('live-canvas').width")
    assert 0 < width <= 640
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('stop-button').disabled")
    context.close()
