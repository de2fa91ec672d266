"""The web page at ``/`` (plain HTML/JS/CSS from ``service/static``) and ``GET /v1/classes`` for its legend."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from ..deps import ApiError, EngineDep

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Served files by name: an explicit list, so no request path ever reaches the file system.
JS = "text/javascript; charset=utf-8"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "style.css": "text/css; charset=utf-8",
                "app.js": JS, "stream.js": JS, "models.js": JS, "adapt.js": JS, "plot.js": JS,
                "favicon.ico": "image/x-icon"}

router = APIRouter(tags=["web"])


class ClassInfo(BaseModel):
    model_version: str
    backend: str
    classes: list[str] = Field(description="class names; a label map's pixel value indexes this list")
    palette: list[list[int]] = Field(description="RGB colour per class")
    input_size: list[int] = Field(description="(height, width) the network runs at")


def _static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The web page: upload a video or stream a webcam and watch the overlay."""
    return _static("index.html")


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    """The page's icon (a 16 and 32 px ICO made once with Pillow and committed), so browsers get no 404."""
    return _static("favicon.ico")


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    return _static(name)


@router.get("/v1/classes", summary="Classes and colours of the model being served")
def classes(engine: EngineDep) -> ClassInfo:
    """The live model's class names and palette (label maps hold indices into `classes`)."""
    meta = engine.meta
    return ClassInfo(model_version=engine.version, backend=engine.backend, classes=list(meta["classes"]),
                     palette=[[int(v) for v in c] for c in meta["palette"]],
                     input_size=[int(v) for v in meta["input_size"]])
