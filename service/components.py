"""Everything one app owns, built in one place and started and stopped in one order.

``build_components`` (called by ``service.app.create_app``, nothing at import) builds every part eagerly
from the settings; ``Components.running`` is the app's one lifespan:

==  =========================================================  =====================================
    start (in this order)                                       stop (reverse order)
==  =========================================================  =====================================
1   registry: create it, seed an empty one with the demo model  --
2   engine manager: load the ACTIVE version in the background  stop the watcher
3   data plane: decoder fork server, recover upload jobs        cancel queued jobs, remove temp files
4   adaptation plane: sweep buffer and jobs, maybe the worker   flush the clip writer, stop the worker
5   sources (nothing to start: created by ``POST /v1/sources``) stop every source
==  =========================================================  =====================================

A failed start stops what already started. Draining (``service.drain``) happens before the stop: by
then no new work arrives and in-flight uploads have finished (or run out of ``drain_timeout_s``).

Routes get these parts through ``service.deps`` (``app.state`` carries each under its field name).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from models.checkpoint import CheckpointError

from . import sandboxed_decode
from .adapt_jobs import AdaptJobStore
from .auto_rounds import AutoCollector, auto_enabled
from .batcher import Batcher
from .buffer import ClipBuffer, ClipCollector, ClipInfo
from .collect import ClipSampler, Provenance, RateLimiter, clip_sampler
from .drain import Drain
from .drift import DriftMonitor
from .segment_jobs import DataPlane, FairLock, JobStore
from .engine_manager import EngineFactory, EngineManager, EngineOptions, make_engine_factory
from .metrics import Metrics
from .registry_api import Registry, open_registry
from .routing import DomainRoutes
from .routing_metrics import attach_routes
from .settings import Settings
from .sources.manager import SourceManager
from .storage import StoreError
from .worker_supervisor import WorkerSupervisor, worker_command
from .worker import clip_buffer, job_store, worker_settings_json

log = logging.getLogger("vss.app")


@dataclass
class AdaptationPlane:
    """The clip buffer, its writer thread, the per-client clip rate limit, the adaptation job store and,
    with ``VSS_WORKER=spawn``, the supervisor of the worker child process (started with the first job, or
    at startup when the auto policy is on or a job is waiting)."""

    settings: Settings
    metrics: Metrics
    buffer: ClipBuffer
    collector: ClipCollector
    jobs: AdaptJobStore
    supervisor: WorkerSupervisor | None
    limiter: RateLimiter

    def start(self) -> None:
        try:
            self.jobs.ensure()
            self.jobs.sweep()  # temp files of a process that died
            self.buffer.sweep()
        except StoreError as e:  # the object store is down: routes answer 503 until it returns
            log.error("cannot reach the clip buffer or the adaptation jobs in %s: %s", self.jobs.root, e)
        except OSError as e:  # a read-only or full disk: adapt and clip routes answer 503/507 until it is fixed
            log.error("the clip buffer or the adaptation job directory is not usable: %s", e)
        try:
            pending = self.jobs.active() is not None
        except OSError as e:  # the store is down (StoreError) or unreadable: start the worker anyway; it waits
            log.error("cannot read adaptation jobs in %s: %s", self.jobs.root, e)
            pending = True
        if auto_enabled(self.settings) or pending:
            self.ensure_worker()

    def offer(self, frames: list[np.ndarray], source: str, prov: Provenance) -> bool:
        """Hand a sampled clip to the collector if the client is within its rate limit (any thread)."""
        if not self.limiter.take(prov.client):
            self.metrics.buffer_clips_refused.labels(reason="rate_limited").inc()
            return False
        if not self.collector.submit(frames, source, prov.to_dict()):
            self.metrics.buffer_clips_refused.labels(reason="queue_full").inc()
            return False
        return True

    def sampler(self, source: str, prov: Provenance, hold: bool = False) -> ClipSampler | None:
        """The clip-collection hook of one upload, stream or source (``service.collect.clip_sampler``)."""
        return clip_sampler(self.settings, self.offer, self.collector.size_fn(), source, prov, hold)

    def ensure_worker(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()

    def worker_status(self) -> dict[str, Any]:
        s = self.settings
        sup = self.supervisor
        return {"mode": s.worker, "restarts": sup.restarts if sup else 0,
                "alive": len(self.jobs.workers(max(3 * s.adapt_heartbeat_s, 5.0)))}

    def close(self) -> None:
        self.collector.close()
        if self.supervisor is not None:
            self.supervisor.stop()


@dataclass(frozen=True)
class Components:
    """The parts of one app; ``app.state.<field>`` is each of them (``service.deps`` reads them)."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    engine_manager: EngineManager
    drain: Drain
    drift: DriftMonitor
    data_plane: DataPlane
    adaptation: AdaptationPlane
    sources: SourceManager
    routes: DomainRoutes  # per-domain versions (service/routing.py), polled by the engine manager's watcher

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The app's lifespan: start in the order of the module docstring, stop in reverse."""
        async with AsyncExitStack() as stack:
            await run_in_threadpool(prepare_registry, self.settings, self.registry)
            self.engine_manager.start()  # loads the active version in the background; /readyz says when
            stack.push_async_callback(run_in_threadpool, self.engine_manager.stop)
            await run_in_threadpool(start_data_plane, self.data_plane)
            stack.push_async_callback(run_in_threadpool, self.data_plane.close)
            await run_in_threadpool(self.adaptation.start)
            stack.push_async_callback(run_in_threadpool, self.adaptation.close)
            stack.push_async_callback(run_in_threadpool, self.sources.close)
            yield


def build_components(settings: Settings, engine_factory: EngineFactory | None = None) -> Components:
    """Every part of an app, built (nothing started: no thread, no child process, no file written)."""
    metrics = Metrics()
    registry = open_registry(settings.model_dir, settings.cache_dir)
    options = EngineOptions(settings.engine, settings.device, settings.half, settings.intra_op_threads,
                            settings.onnx_exporter, settings.onnx_tensorrt, settings.cache_dir)
    manager = EngineManager(registry, engine_factory or make_engine_factory(options),
                            poll_interval_s=settings.registry_poll_ms / 1000.0,
                            retry_failed_s=settings.registry_retry_s, warmup=settings.warmup)
    metrics.watch_engine(manager)
    drift = DriftMonitor()  # service/drift.py: the drift signal of this process
    metrics.watch_drift(drift)
    lock = FairLock()  # every network call of the app, in arrival order
    data = DataPlane(JobStore(settings.job_dir, settings.job_ttl_s), lock,
                     Batcher(settings.batch_max, settings.batch_wait_ms / 1000.0, lock))
    adaptation = build_adaptation(settings, metrics, manager)
    routes = attach_routes(manager, settings, metrics, drift)
    sources = SourceManager(settings, metrics, manager, drift, lock, adaptation.sampler, routes=routes)
    return Components(settings, metrics, registry, manager, Drain(), drift, data, adaptation, sources, routes)


def build_adaptation(settings: Settings, metrics: Metrics, manager: EngineManager) -> AdaptationPlane:
    buffer = clip_buffer(settings)

    def input_size() -> tuple[int, int] | None:
        engine = manager.peek()
        return None if engine is None else (int(engine.meta["input_size"][0]), int(engine.meta["input_size"][1]))

    def added(info: ClipInfo) -> None:
        metrics.buffer_clips_added.labels(source=info.source).inc()

    jobs = job_store(settings)
    metrics.registry.register(AutoCollector(jobs))  # the worker's auto policy (service/auto_rounds.py)
    supervisor = None
    if settings.worker == "spawn":
        supervisor = WorkerSupervisor(worker_command(worker_settings_json(settings), os.getpid()), jobs,
                                      settings.adapt_heartbeat_timeout_s)
    return AdaptationPlane(settings, metrics, buffer, ClipCollector(buffer, input_size, on_added=added), jobs,
                           supervisor, RateLimiter(settings.collect_rate_clips, settings.collect_rate_window_s))


def start_data_plane(data: DataPlane) -> None:
    sandboxed_decode.warm_up()  # the decoder fork server, so the first upload does not wait
    try:  # recover the jobs of a predecessor that died (kill -9), sweep its temp files
        data.jobs.start()
    except OSError as e:  # a read-only or full job directory: uploads answer 503/507 until it is fixed
        log.error("the upload job directory is not usable: %s", e)


def prepare_registry(settings: Settings, registry: Registry) -> None:
    """Startup work before serving: registry directory and first-start seeding."""
    registry.ensure()
    try:
        seeded = registry.seed(settings.demo_model)
        empty = not seeded and not registry.versions()
    except CheckpointError as e:
        log.error("cannot seed the registry from %s: %s", settings.demo_model, e)
        return
    except StoreError as e:  # the watcher keeps polling; the replica becomes ready once the store answers
        log.error("model registry %s is unreachable at startup: %s", registry.location, e)
        return
    if seeded:
        log.info("initialised model registry %s with %s from %s", registry.location, seeded, settings.demo_model)
    elif empty:
        log.warning("model registry %s is empty and no demo model is configured; "
                    "import one with `vss models import PATH`", registry.location)
