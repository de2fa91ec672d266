"""HTTP and websocket routes, one module per resource; ``routers()`` lists them in include order."""

from __future__ import annotations

from fastapi import APIRouter

from . import adapt, clips, docs, health, models, segment, stream, web


def routers() -> list[APIRouter]:
    """Every router of the app (imported explicitly; no import-time registration)."""
    return [health.router, models.router, segment.router, stream.router, web.router, adapt.router, clips.router,
            docs.router]
