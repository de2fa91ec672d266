"""The web page in headless Chromium (playwright, system ``chromium``) against a real uvicorn on loopback.

The adaptation side of the page (clip collection, adapt form, gate metrics, rollback) is in
``test_web_adapt.py``. Set ``VSS_TEST_SCREENSHOTS=DIR`` to keep the screenshots of the main states.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.registry import ModelRegistry
from service.routes.web import STATIC_FILES
from service.settings import Settings
from tests.service.live import live_server
from tests.waiting import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = os.environ.get("VSS_TEST_SCREENSHOTS")  # set to keep the screenshots somewhere
# Records every text the status lines show (they change faster than a test can poll).
RECORD_STATUSES = """document.addEventListener("DOMContentLoaded", () => {
  window.statusLog = [];
  for (const id of ["upload-status", "stream-status", "adapt-status", "models-status"]) {
    const el = document.getElementById(id);
    new MutationObserver(() => window.statusLog.push(`${id}: ${el.textContent}`))
      .observe(el, { childList: true, characterData: true, subtree: true });
  }
});"""


def make_app(root: Path, checkpoint: Path, versions: int = 1, **overrides: object) -> FastAPI:
    for _ in range(versions):
        ModelRegistry(root / "models").import_dir(checkpoint, activate=True)
    return create_app(Settings(_env_file=None, **{
        "model_dir": root / "models", "job_dir": root / "jobs", "cache_dir": root / "cache",
        "buffer_dir": root / "buffer", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
        "device": "cpu", "flow": "dis-ultrafast", "buffer_enabled": False, **overrides}))


def write_video(path: Path, width: int, height: int, frames: int, fps: float = 10.0) -> Path:
    """A moving gradient clip of ``frames`` frames at ``fps``."""
    from service.video_io import VideoWriter

    y, x = np.mgrid[0:height, 0:width]
    with VideoWriter(path, fps, width, height, crf=20) as writer:
        for t in range(frames):
            frame = np.stack([(x * 255 // width + 8 * t) % 256, y * 255 // height,
                              np.full_like(x, (40 * t) % 256)], axis=-1).astype(np.uint8)
            writer.write(frame)
    return path


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
def served(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[tuple[str, FastAPI]]:
    """One live server for the browser tests; uploads of more than 4 frames run as jobs."""
    app = make_app(tmp_path_factory.mktemp("web"), tiny_checkpoint, job_frame_threshold=4)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def site(served: tuple[str, FastAPI]) -> str:
    return served[0]


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory, synthetic_video) -> Path:
    """The first 4 frames of the synthetic clip: answered synchronously by ``site``."""
    from service.video_io import VideoWriter

    path = tmp_path_factory.mktemp("short") / "short.mp4"
    with VideoWriter(path, synthetic_video.fps, 128, 64, crf=18) as writer:
        for frame in synthetic_video.frames[:4]:
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """10 fps clips: 4:3 (3 s), 16:9 (2 s), and a long one (240 frames) for a job that runs a while."""
    root = tmp_path_factory.mktemp("clips")
    return {"4:3": write_video(root / "four_three.mp4", 160, 120, 30),
            "16:9": write_video(root / "wide.mp4", 192, 108, 20),
            "long": write_video(root / "long.mp4", 128, 64, 240)}


def open_page(browser, url: str, width: int = 1280, height: int = 900, **context: object):
    """A page in a fresh context, with its console messages collected in ``page.console``."""
    page = browser.new_context(viewport={"width": width, "height": height}, **context).new_page()
    page.console = []
    page.on("console", lambda message: page.console.append(f"{message.type}: {message.text}"))
    page.add_init_script(RECORD_STATUSES)
    page.goto(url)
    return page


def shot(page, tmp_path: Path, name: str) -> Path:
    path = Path(SCREENSHOT_DIR or tmp_path) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def statuses(page, element: str) -> list[str]:
    prefix = f"{element}: "
    return [s[len(prefix):] for s in page.evaluate("window.statusLog") if s.startswith(prefix)]


def text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_page_and_static_files_are_served(site: str) -> None:
    page = httpx.get(f"{site}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="video-file"', 'id="live-canvas"', 'id="legend"', 'id="models"', 'id="adapt-panel"',
                   'id="rollback-button"', 'id="upload-collect"', 'id="stream-collect"', 'rel="icon"'):
        assert needle in page.text
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")  # no CDN in <head>
    for name, media_type in STATIC_FILES.items():
        response = httpx.get(f"{site}/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == media_type, name
    icon = httpx.get(f"{site}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
    assert httpx.get(f"{site}/static/secret.txt").status_code == 404
    assert httpx.get(f"{site}/static/%2E%2E%2Fsettings.py").status_code == 404
    classes = httpx.get(f"{site}/v1/classes").json()
    assert classes["model_version"] == "v0001" and len(classes["classes"]) == len(classes["palette"]) == 7


def test_upload_shows_the_overlay_video_and_legend(browser, site: str, short_video: Path, tmp_path: Path) -> None:
    page = open_page(browser, site)
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"not a video at all\n" * 100)
    page.set_input_files("#video-file", str(bad))
    page.click("#upload-button")
    page.wait_for_selector("#upload-status.error")  # errors are shown, and the page stays usable
    assert "unsupported_media_type" in text(page, "#upload-status")
    assert text(page, "#upload-progress .label") == "failed"  # not a stale "segmenting …"
    assert page.locator("#upload-progress.failed").count() == 1
    page.wait_for_selector("#legend li")
    assert page.locator("#legend li").count() == 7
    page.wait_for_selector("#models li.active")
    assert text(page, "#models li.active .version") == "v0001"
    assert "no parent" in text(page, "#models li.active .provenance")
    assert page.locator("#rollback-button").is_hidden()  # one version: nothing to roll back to
    has_adapt = "/v1/adapt" in page.evaluate("fetch('/openapi.json').then(r => r.json())")["paths"]
    page.wait_for_function(f"document.getElementById('adapt-panel').hidden === {str(not has_adapt).lower()}")
    page.wait_for_function("document.querySelector('.buffer-count').textContent.includes('off')")
    assert page.locator("#upload-collect").is_disabled()  # this server collects nothing: said so
    page.set_input_files("#video-file", str(short_video))
    page.select_option("#upload-format", "mp4")
    page.click("#upload-button")  # 4 frames: the result comes back with the response
    page.wait_for_function("document.getElementById('result-video').readyState >= 2", timeout=60_000)
    size = page.evaluate("[document.getElementById('result-video').videoWidth, "
                         "document.getElementById('result-video').videoHeight]")
    assert size == [128, 64]
    assert "segmented" in text(page, "#upload-status")
    assert text(page, "#upload-progress .label") == "done" and page.locator("#upload-progress.failed").count() == 0
    shot(page, tmp_path, "upload-1280.png")
    page.context.close()


def test_job_statuses_and_the_legend_follow_each_upload(browser, site: str, synthetic_video, clips,
                                                        short_video: Path, tmp_path: Path) -> None:
    page = open_page(browser, site)
    page.set_input_files("#video-file", str(clips["long"]))
    page.select_option("#upload-format", "json")
    page.click("#upload-button")  # 240 frames > 4: a job, polled by the page
    page.wait_for_selector("#result-stats tr", timeout=120_000)
    assert page.locator("#result-stats tr").count() == 7
    assert page.locator("#upload-progress .bar").evaluate("e => e.style.width") == "100%"
    seen = statuses(page, "upload-status")
    assert any(" running · " in s for s in seen), seen  # the job's own state, not "queued" throughout
    assert seen[-1].startswith("segmented long.mp4")
    assert page.locator("#legend .fraction").count() == 7
    assert "long.mp4" in text(page, "#legend-source")
    page.set_input_files("#video-file", str(short_video))
    page.select_option("#upload-format", "mp4")
    page.click("#upload-button")
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('segmented')",
                           timeout=60_000)
    assert page.locator("#legend .fraction").count() == 0  # the previous upload's shares are gone
    page.context.close()


def _painted(page) -> list[int]:
    return page.evaluate("""() => {
        const c = document.getElementById('live-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lit = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 0) lit++;
        return [c.width, c.height, lit];
    }""")


def _sent_frames(page) -> list[int]:
    """Counts binary messages the page sends on its websockets (seen by the browser, not the page)."""
    sent: list[int] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(len(payload))
                                          if isinstance(payload, bytes) else None))
    return sent


@pytest.mark.parametrize("width,clip", [(1280, "4:3"), (1920, "16:9")])
def test_stream_keeps_the_aspect_ratio_and_the_files_frame_rate(browser, site: str, clips, width: int, clip: str,
                                                                 tmp_path: Path) -> None:
    page = open_page(browser, site, width=width, height=1000)
    sent = _sent_frames(page)
    page.set_input_files("#stream-file", str(clips[clip]))
    page.wait_for_function("document.getElementById('stat-version').textContent.startsWith('v0001')",
                           timeout=60_000)
    page.wait_for_function("document.getElementById('stream-status').textContent.startsWith('streaming to v0001')")
    page.wait_for_function("live.mediaSeconds > 2.5", timeout=60_000)  # more than one loop of the 2 s clip
    width_px, height_px, lit = _painted(page)
    expected = {"4:3": (160, 120), "16:9": (192, 108)}[clip]
    assert (width_px, height_px) == expected and lit > 0.5 * width_px * height_px
    shown = page.evaluate("(() => { const r = document.getElementById('live-canvas').getBoundingClientRect();"
                          " return r.width / r.height; })()")
    assert shown == pytest.approx(expected[0] / expected[1], rel=0.02)  # not stretched to 2:1
    counts = page.evaluate("({frames: live.frames, media: live.mediaSeconds, presented: live.lastPresented})")
    # at most one message per frame the 10 fps video presented: a frame is never sent twice
    assert 0 < counts["frames"] <= 10 * counts["media"] + 2, counts
    assert len(sent) >= counts["frames"] and len(sent) <= 10 * counts["media"] + 3
    page.wait_for_selector("#live-plot:not([hidden])")
    shot(page, tmp_path, f"stream-{width}.png")
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('stream-status').textContent.startsWith('stopped after')")
    assert not any(s.startswith("streaming to") for s in statuses(page, "stream-status")[-1:])
    page.set_input_files("#stream-file", str(clips[clip]))  # start and stop again at once
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('stop-button').disabled")
    # no send on a closed socket, and no 404 (the favicon was one)
    assert not [m for m in page.console if "CLOSING or CLOSED" in m or "404" in m], page.console
    page.context.close()


def test_stream_reconnects_when_the_server_drains(browser, served: tuple[str, FastAPI], clips) -> None:
    url, app = served
    drain = app.state.drain
    page = open_page(browser, url)
    page.set_input_files("#stream-file", str(clips["4:3"]))
    page.wait_for_function("parseFloat(document.getElementById('stat-fps').textContent) > 0", timeout=60_000)
    waiter = wait_until(lambda: next(iter(drain._waiters), None), 30, "the stream to wait on the drain")
    loop = waiter.get_loop()
    try:
        loop.call_soon_threadsafe(drain.begin)  # as SIGTERM does: the stream closes with 1012
        page.wait_for_function("window.statusLog.some(s => s.includes('restarting (1012)'))", timeout=30_000)
        page.wait_for_function("window.statusLog.some(s => s.includes('no server yet'))", timeout=30_000)
    finally:
        loop.call_soon_threadsafe(setattr, drain, "draining", False)  # "another replica" takes it
    page.wait_for_function("document.getElementById('stream-status').textContent.includes('(reconnected)')",
                           timeout=30_000)
    before = page.evaluate("live.frames")
    page.wait_for_function(f"live.frames > {before} && document.getElementById('stat-fps').textContent !== '–'",
                           timeout=30_000)  # frames flow again on the new connection
    assert page.evaluate("stream.reconnected") == 1 and not page.locator("#stream-status.error").count()
    page.click("#stop-button")
    page.context.close()


def test_webcam_stream_draws_a_live_overlay(browser, site: str) -> None:
    page = open_page(browser, site, permissions=["camera"])
    page.click("#webcam-button")  # Chromium's fake camera stands in for getUserMedia
    page.wait_for_function("parseFloat(document.getElementById('stat-fps').textContent) > 0", timeout=60_000)
    assert text(page, "#stat-version").startswith("v0001")
    assert text(page, "#stat-dropped").split()[0].isdigit()
    width = page.evaluate("document.getElementById('live-canvas').width")
    assert 0 < width <= 640
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('stop-button').disabled")
    page.context.close()


@pytest.mark.parametrize("width", [1280, 1440, 1920])
def test_layout_fills_common_widths_without_overflow(browser, site: str, width: int, tmp_path: Path) -> None:
    page = open_page(browser, site, width=width, height=900)
    page.wait_for_selector("#models li.active")
    page.evaluate("""() => {  // long texts, as a failing job or a long file name would show
        const long = 'failed: ' + 'averyveryverylongwordwithoutspaces'.repeat(6);
        setStatus(document.getElementById('adapt-status'), long, true);
        document.getElementById('adapt-details').hidden = false;
        document.getElementById('adapt-job').textContent = 'ab12cd34 · selftrain · running ' + 'x'.repeat(120);
    }""")
    layout = page.evaluate("""() => {
        const cards = [...document.querySelectorAll('.card')].filter(c => !c.hidden);
        const main = document.querySelector('main').getBoundingClientRect();
        const columns = new Set(cards.map(c => Math.round(c.getBoundingClientRect().left)));
        const area = cards.reduce((sum, c) => {
            const r = c.getBoundingClientRect();
            return sum + r.width * r.height;
        }, 0);
        return { columns: columns.size, fill: area / (window.innerWidth * main.height),
                 overflow: cards.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.id) };
    }""")
    assert layout["overflow"] == []
    assert layout["columns"] >= (3 if width >= 1700 else 2)
    assert layout["fill"] > 0.5, layout  # cards, not empty space, fill the page
    shot(page, tmp_path, f"layout-{width}.png")
    page.context.close()
