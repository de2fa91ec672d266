"""The adaptation side of the web page in headless Chromium against a real uvicorn on loopback with a
spawned adaptation worker: clip collection (visible and switchable), the adapt form's validation and the
server's 422, a real job's loss plot, gate metrics and provenance, and the rollback button."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.registry import ModelRegistry
from tests.service.live import live_server
from tests.service.test_web import browser, make_app, open_page, shot, text, write_video  # noqa: F401

API_KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def adapted_copy(checkpoint: Path, root: Path) -> Path:
    """``checkpoint`` with the metadata an adapted version has (parent, method, domains, gate)."""
    from models.checkpoint import META

    copy = root / "adapted"
    shutil.copytree(checkpoint, copy)
    meta = json.loads((copy / META).read_text())
    meta["parent"] = "v0001"
    meta["provenance"].update(method="stpl", domains=["fog", "night"], gate={"passed": True, "reasons": []})
    (copy / META).write_text(json.dumps(meta))
    return copy


@pytest.fixture(scope="module")
def adapt_site(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[tuple[str, FastAPI]]:
    """v0001 and v0002 adapted from it (active), clip collection on (a 2-frame clip every 2 frames), a worker."""
    root = tmp_path_factory.mktemp("webadapt")
    ModelRegistry(root / "models").import_dir(tiny_checkpoint)
    app = make_app(root, adapted_copy(tiny_checkpoint, root), buffer_enabled=True,
                   buffer_clip_frames=2, buffer_clip_every=2, adapt_min_clips=1, worker="spawn", adapt_threads=1,
                   api_key=API_KEY, collect="all")  # "all": the browser's websocket cannot send the key
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("adaptclip") / "target.mp4", 160, 120, 24)


def clip_count(url: str) -> int:
    return httpx.get(f"{url}/v1/clips").json()["clips"]


def test_uploads_and_streams_feed_the_buffer_unless_switched_off(browser, adapt_site, clip: Path,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    url, app = adapt_site
    page = open_page(browser, url)
    page.wait_for_function("document.querySelector('.buffer-count').textContent === '(buffer: 0 clips)'")
    page.uncheck("#upload-collect")
    page.set_input_files("#video-file", str(clip))
    page.select_option("#upload-format", "json")
    page.click("#upload-button")
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('segmented')",
                           timeout=60_000)
    assert app.state.adaptation.collector.flush(60)
    assert clip_count(url) == 0  # the switch was honoured: ?collect=false

    page.check("#upload-collect")
    page.click("#upload-button")
    page.wait_for_function("document.getElementById('upload-status').textContent.includes('adaptation buffer')",
                           timeout=60_000)
    assert app.state.adaptation.collector.flush(60)
    count = clip_count(url)
    assert count > 0
    page.wait_for_function(f"document.querySelector('.buffer-count').textContent === '(buffer: {count} clips)'",
                           timeout=30_000)  # the page shows what the upload collected
    assert f"clip buffer: {count} clips" in text(page, "#adapt-buffer")

    configs: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda p: configs.append(p) if isinstance(p, str) else None))
    page.uncheck("#stream-collect")
    page.set_input_files("#stream-file", str(clip))
    page.wait_for_function("document.getElementById('stream-status').textContent.startsWith('streaming to')",
                           timeout=60_000)
    assert "feeding" not in text(page, "#stream-status")
    page.click("#stop-button")
    page.check("#stream-collect")
    page.set_input_files("#stream-file", str(clip))
    page.wait_for_function("document.getElementById('stream-status').textContent.includes('feeding the adaptation')",
                           timeout=60_000)
    page.click("#stop-button")
    assert [c.replace(" ", "") for c in configs] == ['{"format":"rle","collect":false}',
                                                     '{"format":"rle","collect":true}']
    shot(page, tmp_path, "collect-1280.png")
    page.context.close()


def test_adapt_form_validates_and_a_job_shows_its_loss_gate_and_provenance(browser, adapt_site,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    url, app = adapt_site
    if clip_count(url) == 0:
        pytest.skip("needs the clips collected by the previous test")
    page = open_page(browser, url, width=1920, height=1000)
    page.wait_for_selector("#adapt-panel:not([hidden])")
    page.wait_for_selector("#models li.active")
    assert text(page, "#models li[data-version=v0001] .provenance").startswith("test-random-init · no parent · ")
    assert text(page, "#models li[data-version=v0002] .provenance").startswith("method stpl · from v0001 · ")
    assert text(page, "#models li[data-version=v0002] .provenance").endswith(" UTC · domains fog, night · gate passed")
    page.fill("#adapt-lr", "abc")
    page.click("#adapt-start")
    page.wait_for_selector("#adapt-status.error")
    assert 'lr must be a positive number such as 0.001 or 1e-4, not "abc"' in text(page, "#adapt-status")
    assert httpx.get(f"{url}/v1/adapt").json()["jobs"] == []  # no job started with a default lr
    page.fill("#adapt-lr", "")
    page.fill("#adapt-steps", "20")
    page.click("#adapt-start")
    page.wait_for_function("document.getElementById('adapt-status').textContent.startsWith('unauthorized')")
    page.fill("#adapt-key", API_KEY)
    page.fill("#adapt-steps", "999999")
    page.click("#adapt-start")
    page.wait_for_function("document.getElementById('adapt-status').textContent.startsWith('invalid_request')")
    assert "over the limit" in text(page, "#adapt-status")  # the server's 422, as it said it
    assert httpx.get(f"{url}/v1/adapt").json()["jobs"] == []

    page.fill("#adapt-steps", "20")
    page.fill("#adapt-lr", "1e-4")
    page.click("#adapt-start")
    page.wait_for_function("['published', 'rejected'].some(s => "
                           "document.getElementById('adapt-status').textContent.startsWith(s))", timeout=240_000)
    job = httpx.get(f"{url}/v1/adapt").json()["jobs"][0]
    assert job["request"]["lr"] == 1e-4 and job["steps"] == 20
    assert len(job["losses"]) >= 2
    assert page.locator("#adapt-plot").is_visible()
    assert page.evaluate("""(() => { const c = document.getElementById('adapt-plot');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 150 && d[i] < 100) blue++;
        return blue; })()""") > 20  # the loss line is drawn
    verdict = "passed" if job["gate"]["passed"] else "rejected"
    assert text(page, "#adapt-gate") == verdict
    rows = page.locator("#adapt-metrics tr")
    assert rows.count() == len(job["gate"]["metrics"]) >= 3
    assert "agreement" in text(page, "#adapt-metrics")
    if job["state"] == "published":
        page.wait_for_function(f"document.querySelector('#models li.active .version').textContent === "
                               f"'{job['version']}'", timeout=30_000)
        provenance = text(page, "#models li.active .provenance")
        assert provenance.startswith("method tent · from v0002 · ") and "gate passed" in provenance
    shot(page, tmp_path, "adapt-1920.png")
    page.context.close()


def test_rollback_button_asks_then_activates_the_previous_version(browser, adapt_site, tmp_path: Path) -> None:  # noqa: F811
    url, app = adapt_site
    active = httpx.get(f"{url}/v1/models").json()
    versions = [v["version"] for v in active["versions"]]
    current = active["active"]
    target = next((v["parent"] for v in active["versions"] if v["version"] == current and v["parent"]),
                  versions[versions.index(current) - 1])
    page = open_page(browser, url)
    page.wait_for_selector("#rollback-button:not([hidden])")
    assert text(page, "#rollback-button") == f"Roll back to {target}"
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#rollback-button")
    page.wait_for_function("document.getElementById('models-status').textContent === 'rollback cancelled'")
    assert httpx.get(f"{url}/v1/models").json()["active"] == current

    page.fill("#adapt-key", API_KEY)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#rollback-button")
    page.wait_for_function("document.getElementById('models-status').textContent.startsWith('rolled back')",
                           timeout=60_000)
    assert text(page, "#models-status") == f"rolled back: {target} is active and served (was {current})"
    assert httpx.get(f"{url}/v1/models").json()["active"] == target
    page.wait_for_function(f"document.querySelector('#models li.active .version').textContent === '{target}'")
    assert text(page, "#active-version") == target
    shot(page, tmp_path, "rollback-1280.png")
    page.context.close()
