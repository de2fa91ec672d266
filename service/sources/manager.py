"""The app's sources: at most ``sources_max`` of them, each a ``Source`` with its own two threads.

Built with the app (``service.components``, ``app.state.sources``) and stopped when the app stops. It is
also the context a ``Source`` works in: settings, the allow-list, the engine manager and the app's
FIFO engine lock (shared with uploads and websocket streams), metrics, the drift monitor, the flow
provider and the clip-collection hook.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable

from models.flow import FlowProvider, build_flow

from ..collect import ClipSampler, Provenance
from ..drift import DriftMonitor
from ..segment_jobs import FairLock
from ..engine_manager import EngineManager
from ..routing import DomainRoutes
from ..metrics import Metrics
from ..settings import Settings
from .policy import SourcePolicy
from .source import Source, SourceSpec

STOP_GRACE_S = 2.0  # beyond the read timeout, for a frame in the network to finish


class TooManySources(RuntimeError):
    """``sources_max`` sources exist already (or it is 0: sources are off)."""


class SourceManager:
    def __init__(self, settings: Settings, metrics: Metrics, engine_manager: EngineManager, drift: DriftMonitor,
                 engine_lock: FairLock, collect: Callable[[str, Provenance], ClipSampler | None],
                 policy: SourcePolicy | None = None, routes: DomainRoutes | None = None) -> None:
        """``collect(source, provenance)``: the app's clip-collection hook (``AdaptationPlane.sampler``);
        ``routes``: the app's per-domain routing (``service/routing.py``; None: every frame on the base)."""
        self.settings, self.metrics, self.engine_manager, self.drift = settings, metrics, engine_manager, drift
        self.routes = routes if routes is not None else DomainRoutes(engine_manager.registry, engine_manager.factory)
        self.engine_lock, self.collect = engine_lock, collect
        self.policy = policy if policy is not None else SourcePolicy.from_settings(self.settings)
        self._sources: dict[str, Source] = {}
        self._lock = threading.Lock()

    # --- what a Source needs -------------------------------------------------------------------------
    def flow(self) -> FlowProvider:
        weights = self.settings.raft_weights
        return build_flow(self.settings.flow, str(weights) if weights else None)

    def sampler(self, spec: SourceSpec) -> ClipSampler | None:
        """The clip-collection hook of ``WS /v1/stream``, fed with this source's frames (None when the collect
        policy refuses the source's creator)."""
        if spec.provenance is None:
            return None
        return self.collect("source", spec.provenance)

    # --- the sources ---------------------------------------------------------------------------------
    def create(self, spec: SourceSpec) -> Source:
        """Start a source; raises ``TooManySources``."""
        with self._lock:
            if self.settings.sources_max == 0:
                raise TooManySources("server-side sources are off (VSS_SOURCES_MAX=0)")
            if len(self._sources) >= self.settings.sources_max:
                raise TooManySources(f"{len(self._sources)} sources exist (VSS_SOURCES_MAX="
                                     f"{self.settings.sources_max}); DELETE one first")
            source = Source(spec, self)
            self._sources[source.id] = source
        source.start()
        return source

    def get(self, source_id: str) -> Source | None:
        with self._lock:
            return self._sources.get(source_id)

    def list(self) -> list[Source]:
        with self._lock:
            return sorted(self._sources.values(), key=lambda s: s.created)

    def delete(self, source_id: str) -> Source | None:
        """Stop a source, forget it and remove its HLS files (disk segments stay); None if unknown."""
        with self._lock:
            source = self._sources.pop(source_id, None)
        if source is None:
            return None
        self._stop(source)
        return source

    def _stop(self, source: Source) -> None:
        source.stop(self.settings.sources_read_timeout_s + STOP_GRACE_S)
        self.metrics.sources.labels(state=source.state).dec()
        shutil.rmtree(source.output / "hls", ignore_errors=True)
        try:
            source.output.rmdir()  # when no disk segments are left in it
        except OSError:
            pass

    def close(self) -> None:
        """Stop every source (app shutdown)."""
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
        for source in sources:
            source.request_stop()
        for source in sources:
            self._stop(source)
