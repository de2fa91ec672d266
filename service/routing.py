"""Per-domain versions and routing: each stream and upload is served by the version adapted for its domain.

A version whose ``meta.json`` carries ``"domain": {"signature": [...], "signature_version": 1, "name",
"clips"}`` (an automatic round in domain mode publishes such versions without activating them) and that
is not retired (``Registry.set_retired``) is *routable*. Every server process loads the newest
``max_versions`` routable versions next to its base engine (the ``ACTIVE`` version), verified and warmed
up like a swap, by polling the registry like ``EngineManager`` polls ``ACTIVE`` (``DomainRoutes.sync``).

Each stream keeps a ``SignatureEma`` of its frames' domain signatures (``models.signature``: pixels
only, ~0.4 ms a frame) and is served by the routable version nearest to it when that distance is at
most ``max_distance`` and smaller than the distance to the base's own signature (from the base's
``domain`` meta or its stored source statistics; unknown: the threshold alone decides); otherwise by
the base. To switch, the candidate must beat the version serving now by ``margin`` (no flapping
between two close domains). A switch changes the engine of the stream's ``StreamSegmenter``, which
makes that frame a keyframe: the cached t-1 logits of one version are never fused with another's.
Uploads are routed once by the mean signature of their first frames (``route_clip``).

With no routable version and no base signature nothing is computed: streams take the base engine as before.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models import signature as sig
from models.checkpoint import CheckpointError

from .domains import Choice, Route, RouteTable, base_signature, choose, domain_of
from .drift import DriftMonitor
from .engine import Engine
from .engine_manager import EngineFactory, warm_up
from .registry import RegistryError
from .registry_api import Registry

log = logging.getLogger(__name__)

UPLOAD_FRAMES = 4  # an upload is routed by the mean signature of this many first frames
DRIFT_EVERY = 8  # without routable versions, a stream's signature is sampled every this many frames (drift only)


@dataclass
class StreamState:
    """Visible routing state of one stream (``GET /v1/models/active`` -> ``routing.streams``)."""

    version: str | None = None
    domain: str | None = None
    distance_base: float | None = None
    distance_served: float | None = None
    frames: int = 0
    switches: int = 0


class DomainRoutes:
    """Loads the routable versions of one process and decides, per stream, which one serves."""

    def __init__(self, registry: Registry, factory: EngineFactory, max_versions: int = 4,
                 max_distance: float = 2.5, margin: float = 0.25, alpha: float = 0.1, warmup: bool = True,
                 retry_failed_s: float = 30.0, drift: DriftMonitor | None = None, sample_every: int = 4,
                 poll_s: float = 5.0) -> None:
        self.registry, self.factory, self.drift = registry, factory, drift
        self.sample_every, self.poll_s = max(1, sample_every), poll_s
        self.max_versions, self.max_distance, self.margin, self.alpha = max_versions, max_distance, margin, alpha
        self.warmup, self.retry_failed_s = warmup, retry_failed_s
        self.table = RouteTable()
        self._metas: dict[str, dict[str, Any] | None] = {}  # versions never change: read each meta once
        self._failed: dict[str, float] = {}  # version -> when its engine failed to load
        self._sync_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the stream states and counters below
        self._error: str | None = None
        self._base_for: str | None = None  # the base version whose signature ``table`` holds
        self._polled = -float("inf")  # monotonic time of the last listing
        self.retired: set[str] = set()
        self.streams: dict[str, StreamState] = {}
        self.frames: dict[str, int] = {}  # served frames per version (of routed scopes)
        self.process = sig.SignatureEma(alpha)

    # --- registry side -------------------------------------------------------------------------
    def _meta(self, version: str) -> dict[str, Any] | None:
        """The version's meta (None: unreadable). A broken meta.json is remembered, a store that is down
        (``OSError``) or a version not found yet is asked again at the next poll."""
        if version not in self._metas:
            try:
                self._metas[version] = self.registry.meta(version)
            except CheckpointError:
                self._metas[version] = None
            except (RegistryError, OSError):
                return None
        return self._metas[version]

    def routable(self, versions: list[str], retired: set[str], base: str | None) -> list[str]:
        """The versions to route to: with a domain, not retired, not the base, same classes and input size
        as the base; the newest ``max_versions``."""
        base_meta = self._meta(base) if base is not None else None
        out = []
        for v in versions:
            meta = self._meta(v)
            if v in retired or v == base or meta is None or domain_of(meta) is None:
                continue
            if base_meta is not None and (meta.get("classes") != base_meta.get("classes")
                                          or meta.get("input_size") != base_meta.get("input_size")):
                continue
            out.append(v)
        return out[-self.max_versions:] if self.max_versions > 0 else []

    def sync(self, base: Engine | None, force: bool = False) -> bool:
        """Poll the registry and load/drop route engines; True if the table changed. Never raises for a
        registry that is down or a version that fails to load (the table stays as it was).

        Called after every ``ACTIVE`` poll; it lists the registry only every ``poll_s`` seconds (two LISTs on
        an object store), at once when the base changed or when ``force`` (a retirement through this process).
        """
        with self._sync_lock:
            same_base = (base.version if base is not None else None) == self.table.base_version
            if not force and same_base and time.monotonic() - self._polled < self.poll_s:
                return False
            self._polled = time.monotonic()
            try:
                versions, retired = self.registry.versions(), self.registry.retired()
            except (RegistryError, OSError) as e:
                if str(e) != self._error:
                    log.error("cannot list domain versions in %s: %s", self.registry.location, e)
                self._error = str(e)
                return False
            self._error = None
            self.retired = retired
            base_version = base.version if base is not None else None
            old = self.table
            base_sig = old.base_signature
            if base_version != self._base_for:  # the base changed, or its meta could not be read last time
                meta = self._meta(base_version) if base_version is not None else None
                base_sig = None
                if meta is not None:
                    self._base_for = base_version
                    try:
                        base_sig = base_signature(meta, self.registry.path(base_version))  # type: ignore[arg-type]
                    except (RegistryError, OSError):
                        base_sig = base_signature(meta, None)
            wanted = self.routable(versions, retired, base_version)
            have = {r.version: r for r in old.routes}
            routes = []
            for v in wanted:
                route = have.get(v) or self._load(v)
                if route is not None:
                    routes.append(route)
            table = RouteTable(base_version, base_sig, tuple(routes))
            changed = (table.base_version != old.base_version or [r.version for r in table.routes]
                       != [r.version for r in old.routes] or (base_sig is None) != (old.base_signature is None))
            if changed:
                log.info("domain routes of base %s: %s", base_version,
                         ", ".join(f"{r.version} ({r.domain.name or 'unnamed'})" for r in routes) or "none")
            self.table = table
            return changed

    def _load(self, version: str) -> Route | None:
        failed = self._failed.get(version)
        if failed is not None and time.monotonic() - failed < self.retry_failed_s:
            return None
        meta = self._meta(version)
        domain = domain_of(meta) if meta is not None else None
        if meta is None or domain is None:
            return None
        try:
            engine = self.factory(version, self.registry.path(version), meta)
            if self.warmup:
                warm_up(engine)
        except Exception as e:  # foreign code: a broken version must not stop the others
            self._failed[version] = time.monotonic()
            log.error("cannot load domain version %s (not routed to): %s: %s", version, type(e).__name__, e)
            return None
        self._failed.pop(version, None)
        log.info("loaded domain version %s (%s, %d clips)", version, domain.name or "unnamed", domain.clips)
        return Route(version, domain, engine)

    # --- stream side ---------------------------------------------------------------------------
    def open(self, scope: str) -> StreamRouter:
        with self._lock:
            self.streams[scope] = StreamState()
        return StreamRouter(self, scope)

    def close(self, scope: str) -> None:
        with self._lock:
            self.streams.pop(scope, None)

    def account(self, scope: str, version: str, choice: Choice | None, switched: bool) -> None:
        with self._lock:
            self.frames[version] = self.frames.get(version, 0) + 1
            state = self.streams.get(scope)
            if state is None:
                return
            state.frames += 1
            state.version = version
            if choice is None and switched:  # moved to the base between samples (its version was retired)
                state.domain = state.distance_served = None
            if choice is not None:
                state.domain = choice.route.domain.name if choice.route is not None else None
                state.distance_base, state.distance_served = choice.distance_base, choice.distance_served
            state.switches += int(switched)
        if self.drift is not None and choice is not None:
            self.drift.set_signature_distance(scope, choice.distance_base)
            self.drift.set_signature_distance(None, self.process_distance())

    def observe_process(self, signature: np.ndarray) -> None:
        with self._lock:
            self.process.update(signature)

    def process_distance(self) -> float | None:
        table = self.table
        with self._lock:
            value = self.process.value
        if value is None or table.base_signature is None:
            return None
        return round(sig.distance(value, table.base_signature), 4)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready routing state (``GET /v1/models/active`` -> ``routing``)."""
        table = self.table
        with self._lock:
            streams = {k: vars(v).copy() for k, v in self.streams.items()}
            frames = dict(self.frames)
        return {"base": table.base_version, "base_signature_known": table.base_signature is not None,
                "max_distance": self.max_distance, "margin": self.margin, "max_versions": self.max_versions,
                "routes": [{"version": r.version, "domain": r.domain.name, "clips": r.domain.clips,
                            "distance_to_base": None if table.base_signature is None else
                            round(sig.distance(r.domain.signature, table.base_signature), 4)} for r in table.routes],
                "frames_by_version": frames, "process_distance_to_base": self.process_distance(),
                "streams": streams}


@dataclass
class StreamRouter:
    """Routing state of one stream (websocket or server-side source)."""

    routes: DomainRoutes
    scope: str
    ema: sig.SignatureEma = field(init=False)
    current: Route | None = None
    seen: int = 0

    def __post_init__(self) -> None:
        # ``alpha`` is per frame: sampling every k-th frame, each sample weighs what k frames would have
        self.ema = sig.SignatureEma(1.0 - (1.0 - self.routes.alpha) ** self.routes.sample_every)

    def pick(self, base: Engine, frame: np.ndarray) -> Engine:
        """The engine for this frame of the stream: the base or the route nearest to the stream's domain.

        The signature is computed on every ``sample_every``-th frame (every ``DRIFT_EVERY``-th without
        domain versions: drift only); between samples the stream stays on its version, unless that one left
        the table (retired): then the base serves until the next sample."""
        table = self.routes.table
        self.seen += 1
        held = self.current.version if self.current is not None else None
        choice: Choice | None = None
        if not table.active:
            self.current = None
        elif (self.seen - 1) % (self.routes.sample_every if table.routes else DRIFT_EVERY) == 0:
            value = self.ema.update(sig.frame_signature(frame))
            self.routes.observe_process(value)
            margin = self.routes.margin if self.seen > 1 else 0.0  # the first frame has nothing to hold on to
            choice = choose(table, value, held, self.routes.max_distance, margin)
            self.current = choice.route
        elif not any(r is self.current for r in table.routes):
            self.current = None
        engine = self.current.engine if self.current is not None else base
        now = self.current.version if self.current is not None else None
        self.routes.account(self.scope, engine.version, choice, now != held and self.seen > 1)
        return engine

    @property
    def on_base(self) -> bool:
        """True when the last frame went to the base (the prediction drift signal of service/drift.py is the
        base's: frames of a domain version would keep restarting its reference)."""
        return self.current is None

    def close(self) -> None:
        self.routes.close(self.scope)


def route_clip(routes: DomainRoutes | None, base: Engine,
               frames: Iterable[np.ndarray]) -> tuple[Engine, Iterator[np.ndarray]]:
    """(engine, the same frames) for an upload: routed by the mean signature of its first ``UPLOAD_FRAMES``
    frames. Without routable versions the frames are not looked at."""
    table = routes.table if routes is not None else RouteTable()
    if routes is None or not table.routes:
        return base, iter(frames)
    it = iter(frames)
    head = list(itertools.islice(it, UPLOAD_FRAMES))
    if not head:
        return base, iter(head)
    choice = choose(table, sig.clip_signature(head), None, routes.max_distance, 0.0)
    engine = choice.route.engine if choice.route is not None else base
    return engine, itertools.chain(head, it)
