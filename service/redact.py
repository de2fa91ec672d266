"""What a client may read: error messages name versions, ids and limits, never server paths.

``redact`` replaces each filesystem path in a message by its last component (``/srv/vss/models/v0003/
model.safetensors`` -> ``model.safetensors``). A path is a token that starts with ``/``, ``./``,
``../`` or ``~/`` or has two or more slashes; API routes (``/v1/...``) and URLs are kept. Logs keep the
full text; answers (HTTP error bodies, job errors, model metadata errors) go through this.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[^\s'\"`(),;=<>\[\]{}]+")
_KEEP_PREFIXES = ("/v1/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/stream", "/segment",
                  "/adapt")


def _path_token(token: str) -> bool:
    if "://" in token or token.startswith(_KEEP_PREFIXES):
        return False
    if token.startswith(("/", "./", "../", "~/")):
        return len(token.strip("/.~")) > 0
    return token.count("/") >= 2


def _last_component(match: re.Match[str]) -> str:
    token = match.group(0)
    if not _path_token(token):
        return token
    trail = token[len(token.rstrip(":.")):]  # keep a sentence's punctuation after the path
    name = token[:len(token) - len(trail)].rstrip("/").rsplit("/", 1)[-1]
    return (name or "...") + trail


def redact(message: str) -> str:
    """``message`` with every filesystem path reduced to its last component."""
    return _TOKEN.sub(_last_component, message)
