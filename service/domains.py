"""Per-domain routing, the pure part: what a version's ``domain`` meta says, and the rule that picks the
version serving a signature (``choose``). The service side (loading versions, per-stream state) is
``service/routing.py``; its docstring describes the behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import signature as sig
from models.checkpoint import CheckpointError, load_source_stats

from .engine import Engine


@dataclass(frozen=True)
class Domain:
    """What a version's ``meta.json`` says about the domain it was adapted for."""

    name: str
    clips: int
    signature: np.ndarray  # (signature.LENGTH,) float32


def domain_of(meta: dict[str, Any]) -> Domain | None:
    """The version's domain, or None when it has none, or one of another signature definition."""
    d = meta.get("domain")
    if not isinstance(d, dict) or d.get("signature_version") != sig.VERSION:
        return None
    try:
        vector = np.asarray(d.get("signature"), dtype=np.float32)
    except (TypeError, ValueError):
        return None
    if vector.shape != (sig.LENGTH,) or not np.isfinite(vector).all():
        return None
    clips = d.get("clips")
    return Domain(str(d.get("name") or ""), int(clips) if isinstance(clips, int) else 0, vector)


def base_signature(meta: dict[str, Any], directory: Path | None) -> np.ndarray | None:
    """The base version's own signature: its ``domain`` meta, else its stored source statistics, else None."""
    own = domain_of(meta)
    if own is not None:
        return own.signature
    if directory is None:
        return None
    try:
        stats = load_source_stats(directory)
    except (CheckpointError, OSError):  # unreadable or corrupt statistics: the base signature is unknown
        return None
    if stats is None or stats.signature_version != sig.VERSION:  # another definition is not comparable
        return None
    vector = np.asarray(stats.signature, dtype=np.float32)
    return vector if vector.shape == (sig.LENGTH,) and np.isfinite(vector).all() else None


@dataclass(frozen=True)
class Route:
    version: str
    domain: Domain
    engine: Engine


@dataclass(frozen=True)
class RouteTable:
    """What this process can route to right now; replaced as a whole, never changed in place."""

    base_version: str | None = None
    base_signature: np.ndarray | None = None
    routes: tuple[Route, ...] = ()

    @property
    def active(self) -> bool:
        """True when streams need signatures at all."""
        return bool(self.routes) or self.base_signature is not None


@dataclass
class Choice:
    """The outcome of one routing decision."""

    route: Route | None  # None: the base
    distance_base: float | None  # of the signature to the base's own signature (None: unknown)
    distance_served: float | None  # to the serving version's signature (None: the base, unknown)


def choose(table: RouteTable, query: np.ndarray, current: str | None, max_distance: float,
           margin: float) -> Choice:
    """Pure routing rule (module docstring). ``current``: the version serving the stream now (None: the base).

    Each option has a score: the base ``min(distance to the base signature, max_distance)`` (just
    ``max_distance`` when the base signature is unknown), a route its distance when that is at most
    ``max_distance`` and below the base's distance (else it is no option). The lowest score wins, the
    base on ties; the option serving now is kept unless the winner is lower by at least ``margin``.
    """
    to_base = None if table.base_signature is None else sig.distance(query, table.base_signature)
    options: list[tuple[float, Route | None]] = [(max_distance if to_base is None else min(to_base, max_distance),
                                                  None)]
    for r in table.routes:
        d = sig.distance(query, r.domain.signature)
        if d <= max_distance and (to_base is None or d < to_base):
            options.append((d, r))
    best = options[0]
    for option in options[1:]:
        if option[0] < best[0]:
            best = option
    held = next((o for o in options if (o[1].version if o[1] is not None else None) == current), None)
    if held is not None and held is not best and held[0] - best[0] < margin:
        best = held  # not clearly better: stay (a switch costs a keyframe)
    return Choice(best[1], None if to_base is None else round(to_base, 4),
                  None if best[1] is None else round(best[0], 4))
