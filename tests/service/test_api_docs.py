"""``/docs`` (Swagger UI) and ``/redoc`` render in headless Chromium with every request outside the
server refused: the assets come from the app, not from a CDN."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.service.live import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("docs")
    ModelRegistry(root / "models").import_dir(tiny_checkpoint, activate=True)
    app = create_app(Settings(_env_file=None, model_dir=root / "models", job_dir=root / "jobs",
                              cache_dir=root / "cache", buffer_dir=root / "buffer", demo_model=None,
                              worker="off", device="cpu", intra_op_threads=1))
    with live_server(app) as url:
        yield url


def test_docs_pages_reference_only_local_assets(site: str) -> None:
    for path in ("/docs", "/redoc"):
        page = httpx.get(f"{site}{path}")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "cdn" not in page.text.lower() and "fonts.googleapis" not in page.text
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
        asset = httpx.get(f"{site}/docs-assets/{name}")
        assert asset.status_code == 200 and len(asset.content) > 1000
    assert b"cdn.redoc.ly" not in httpx.get(f"{site}/docs-assets/redoc.standalone.js").content
    assert httpx.get(f"{site}/docs-assets/core.py").status_code == 404
    assert httpx.get(f"{site}/docs-assets/..%2Fcore.py").status_code == 404


def test_docs_render_offline_in_chromium(site: str, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (CI: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    server = urlparse(site).netloc
    refused: list[str] = []

    def only_the_server(route) -> None:
        if urlparse(route.request.url).netloc == server:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", only_the_server)
        page.goto(f"{site}/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
        assert page.locator(".swagger-ui .opblock").count() >= 10
        assert "/v1/segment" in page.locator(".swagger-ui").inner_text()
        page.screenshot(path=str(tmp_path / "docs.png"))
        page.goto(f"{site}/redoc")
        page.wait_for_selector(".redoc-wrap .api-content", timeout=60_000)
        assert "Segment an uploaded video" in page.locator(".api-content").inner_text()
        page.screenshot(path=str(tmp_path / "redoc.png"))
        browser.close()
    assert refused == []
