"""Per-domain routing on the web page (headless Chromium, real uvicorn on loopback): the models list shows each
version's domain and routing state, and a streamed night clip shows the night version serving it."""

from __future__ import annotations

from pathlib import Path

from service.registry import ModelRegistry
from tests.service.live import live_server
from tests.service.sources_support import write_mp4
from tests.service.test_routing import publish_domains, style_frames
from tests.service.test_web import browser, make_app, open_page, shot, text  # noqa: F401
from tests.waiting import wait_until


def test_page_shows_domains_and_the_routed_version(browser, tmp_path: Path,  # noqa: F811
                                                   tiny_checkpoint: Path) -> None:
    publish_domains(ModelRegistry(tmp_path / "models"), tiny_checkpoint, tmp_path)
    app = make_app(tmp_path, tiny_checkpoint, versions=0, route_poll_s=0.1)
    clip = write_mp4(tmp_path / "night.mp4", list(style_frames("night", 20, 8)))
    with live_server(app) as url:
        wait_until(lambda: len(app.state.routes.table.routes) == 2, 60, "two domain versions loaded")
        page = open_page(browser, url)
        page.wait_for_selector("#models li[data-version='v0003']")
        assert "domain night (2 clips" in text(page, "#models li[data-version='v0003']")
        assert "routed here" in text(page, "#models li[data-version='v0002']")
        page.set_input_files("#stream-file", str(clip))
        page.wait_for_function("document.getElementById('stat-version').textContent.startsWith('v0003 (night)')",
                               timeout=60_000)
        shot(page, tmp_path, "stream-routed.png")
        page.click("#stop-button")
        page.context.close()
