"""The web page while the worker's auto policy runs (VSS_ADAPT_AUTO=1), in headless Chromium against a real
uvicorn and a spawned worker: an automatic round appears in the adaptation panel as it happens, with its
gate verdict and version, and the panel shows the policy's decision and round counts."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import FastAPI

from tests.service.test_auto_e2e import API_KEY, post_clip
from tests.service.live import live_server
from tests.service.sources_support import write_mp4
from tests.service.test_routing import style_frames
from tests.service.test_web import browser, make_app, open_page, shot, text  # noqa: F401
from tests.waiting import wait_until


def auto_app(tmp_path: Path, checkpoint: Path, **overrides: object) -> FastAPI:
    """A server whose spawned worker runs the auto policy with a 2-step BN round after 3 drifted clips."""
    return make_app(tmp_path, checkpoint, **{
        "buffer_enabled": True, "worker": "spawn", "adapt_threads": 1, "adapt_min_clips": 2, "adapt_poll_s": 0.1,
        "buffer_heldout_fraction": 0.3, "api_key": API_KEY, "adapt_auto": True, "adapt_auto_min_clips": 3,
        "adapt_auto_interval_s": 3600.0, "adapt_auto_method": "bn", "adapt_auto_steps": 2, **overrides})


def post_source_clips(http: httpx.Client) -> None:
    """Three source-style clips, then wait until the worker has polled once and fixed its base reference."""
    for seed in range(3):
        post_clip(http, "source", seed)
    wait_until(lambda: http.get("/v1/models/active").json()["auto"].get("base_reference"), 240,
               "the worker's first poll")


def test_an_automatic_round_shows_up_on_the_page(browser, tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    app = auto_app(tmp_path, tiny_checkpoint)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        page = open_page(browser, url)
        page.wait_for_selector("#adapt-panel:not([hidden])")
        post_source_clips(http)
        page.wait_for_selector("#adapt-auto:not([hidden])", timeout=30_000)
        assert "0 started" in text(page, "#adapt-auto")
        for seed in range(100, 106):
            post_clip(http, "fog", seed)
        page.wait_for_function("document.getElementById('adapt-job').textContent.includes('automatic round')",
                               timeout=240_000)
        page.wait_for_function("['published', 'rejected'].some((s) => "
                               "document.getElementById('adapt-status').textContent.startsWith(s))", timeout=240_000)
        job = http.get("/v1/adapt").json()["jobs"][0]
        assert job["trigger"] == "auto"
        assert f"domain {job['request']['auto']['domain']['name']}" in text(page, "#adapt-job")
        if job["state"] == "published":
            assert text(page, "#adapt-version") == f"{job['version']} (from v0001; not activated)"
        page.wait_for_function("document.getElementById('adapt-auto').textContent.includes('1 started')",
                               timeout=30_000)
        shot(page, tmp_path, "auto-round-1280.png")
        page.context.close()


def test_the_page_story_a_new_style_gets_a_round_and_the_stream_switches(browser, tmp_path: Path,  # noqa: F811
                                                                          tiny_checkpoint: Path) -> None:
    """The whole story with VSS_ADAPT_AUTO=1 on one page: a new style arrives, the round appears, is gated and
    published as a domain version, and the page's stream of that style is then served by the new version
    (`VSS_ADAPT_GATE=off` so that the tiny model's round publishes whatever the gate says; the verdict still
    shows)."""
    app = auto_app(tmp_path, tiny_checkpoint, adapt_gate="off", route_poll_s=0.1)
    clip = write_mp4(tmp_path / "fog.mp4", list(style_frames("fog", 16, 7)))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        page = open_page(browser, url)
        page.wait_for_selector("#adapt-panel:not([hidden])")
        post_source_clips(http)
        for seed in range(100, 106):
            post_clip(http, "fog", seed)
        page.wait_for_function("document.getElementById('adapt-job').textContent.includes('automatic round')",
                               timeout=240_000)
        page.wait_for_function("document.getElementById('adapt-status').textContent.startsWith('published')",
                               timeout=240_000)
        job = http.get("/v1/adapt").json()["jobs"][0]
        assert job["trigger"] == "auto" and job["state"] == "published"
        version, domain = job["version"], job["request"]["auto"]["domain"]["name"]
        assert http.get("/v1/models/active").json()["version"] == "v0001"  # ACTIVE stays the base
        wait_until(lambda: version in {r.version for r in app.state.routes.table.routes}, 60,
                   "the domain version loaded for routing")
        page.set_input_files("#stream-file", str(clip))
        page.wait_for_function(f"document.getElementById('stat-version').textContent.startsWith('{version} "
                               f"({domain})')", timeout=60_000)
        shot(page, tmp_path, "auto-story-1280.png")
        page.click("#stop-button")
        page.context.close()
