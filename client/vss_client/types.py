"""Typed shapes of the server's JSON bodies and the client's result objects."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from .labels import decode_png, overlay


class ModelInfo(TypedDict, total=False):
    """One version of ``GET /v1/models`` (and ``GET /v1/models/{version}``)."""

    version: str
    parent: str | None
    created: str | None
    active: bool
    serving: bool
    classes: list[str]
    palette: list[list[int]]
    input_size: list[int]
    architecture: dict[str, Any]
    sha256: str | None
    has_onnx: bool
    provenance: dict[str, Any]
    error: str | None


class ServingModel(TypedDict, total=False):
    """``GET /v1/models/active`` and the answer of an activation."""

    version: str
    backend: str
    loaded_at: str | None
    swaps: int
    swap_failures: int
    last_swap: dict[str, Any] | None
    model: ModelInfo


class SegmentJob(TypedDict, total=False):
    """``GET /v1/jobs/{id}``: an upload too long to answer at once."""

    id: str
    state: str  # queued, running, done, failed
    format: str
    frames_done: int
    frames_total: int
    progress: float
    eta_s: float | None
    error: dict[str, Any] | None
    summary: dict[str, Any] | None


class AdaptJob(TypedDict, total=False):
    """``GET /v1/adapt/{id}``."""

    id: str
    state: str  # queued, running, gating, published, rejected, failed, cancelled
    stage: str | None
    step: int
    steps: int
    progress: float
    losses: list[dict[str, float]]
    parent: str | None
    version: str | None
    activated: bool
    gate: dict[str, Any] | None
    error: dict[str, str] | None


ADAPT_FINAL = ("published", "rejected", "failed", "cancelled")


def write_atomic(path: Path, chunks: Iterator[bytes]) -> int:
    """Write ``chunks`` to a temporary file beside ``path`` and rename it into place; returns the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


@dataclass
class SegmentResult:
    """The result of ``segment``: the file (in ``content``, or at ``path`` when an output was given)."""

    format: str
    filename: str
    model_version: str | None
    frames: int | None
    content: bytes | None = None
    path: Path | None = None
    job: SegmentJob | None = None

    def data(self) -> bytes:
        if self.content is not None:
            return self.content
        assert self.path is not None
        return self.path.read_bytes()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result file (atomically) and return its path."""
        target = Path(path)
        write_atomic(target, iter([self.data()]))
        return target

    def json(self) -> Any:
        """The document of a ``json`` result (per-frame class shares and a summary)."""
        if self.format != "json":
            raise ValueError(f"a {self.format} result is not JSON")
        return json.loads(self.data())

    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` of a ``zip`` result: classes, palette, model version, frames, per-frame shares."""
        with zipfile.ZipFile(io.BytesIO(self.data())) as z:
            return dict(json.loads(z.read("manifest.json")))

    def label_maps(self) -> Iterator[np.ndarray]:
        """The (H, W) uint8 label maps of a ``zip`` result, in frame order."""
        if self.format != "zip":
            raise ValueError(f"a {self.format} result has no label maps; ask for format='zip'")
        with zipfile.ZipFile(io.BytesIO(self.data())) as z:
            for name in sorted(n for n in z.namelist() if n.endswith(".png")):
                yield decode_png(z.read(name))


@dataclass
class StreamResult:
    """One answered frame of ``stream``."""

    index: int  # position of the frame in the iterable you passed (0-based, across reconnects)
    labels: np.ndarray  # (H, W) uint8 class indices
    model_version: str
    keyframe: bool  # no cached logits used: first frame, a new model version, or a reconnect
    latency_ms: float
    compute_ms: float
    class_fractions: dict[str, float]
    dropped: int  # frames the server skipped on the current connection so far
    classes: list[str] = field(repr=False, default_factory=list)
    palette: list[list[int]] = field(repr=False, default_factory=list)
    meta: dict[str, Any] = field(repr=False, default_factory=dict)

    def overlay(self, frame: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """This label map blended over ``frame`` ((H, W, 3) uint8 RGB)."""
        return overlay(frame, self.labels, self.palette, alpha)
