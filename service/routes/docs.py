"""Offline API docs: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, their scripts and styles served by
the app itself from the pinned ``fastapi-offline`` package (FastAPI's defaults load them from a CDN, so
``/docs`` was a blank page without internet)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from ..deps import ApiError

ASSET_DIR = Path(str(files("fastapi_offline") / "static"))
ASSET_PREFIX = "/docs-assets"
# Served files by name: an explicit list, so no request path ever reaches the file system.
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}
# ReDoc's bundle loads its sidebar logo from Redocly's CDN: served with the favicon in its place.
REDOC_LOGO = b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"'
OPENAPI_URL = "/openapi.json"
TITLE = "vss API"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=TITLE,
                               swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css",
                               swagger_favicon_url=f"{ASSET_PREFIX}/favicon.png")


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=TITLE, redoc_js_url=f"{ASSET_PREFIX}/redoc.standalone.js",
                          redoc_favicon_url=f"{ASSET_PREFIX}/favicon.png", with_google_fonts=False)


@cache
def _redoc_bundle() -> bytes:
    return (ASSET_DIR / "redoc.standalone.js").read_bytes().replace(
        REDOC_LOGO, f'src:"{ASSET_PREFIX}/favicon.png"'.encode())


@router.get(ASSET_PREFIX + "/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no docs asset {name!r}")
    headers = {"Cache-Control": "max-age=86400"}
    if name == "redoc.standalone.js":
        return Response(_redoc_bundle(), media_type=ASSETS[name], headers=headers)
    return FileResponse(ASSET_DIR / name, media_type=ASSETS[name], headers=headers)
