"""The adaptation worker: a separate process that turns buffered target clips into new model versions.

It polls the job directory (``service.adapt_jobs``), claims one job at a time, loads its *own* copy
of the parent version (the servers' live engines are never touched), runs
``adaptation.sourcefree.adapt`` on the buffered clips, gates the candidate on held-out buffered
clips (and on labeled ``VSS_VAL_DIR`` clips when configured: then mIoU decides), and publishes what
passes (``service.worker_jobs``). The servers' registry watchers then hot-swap or route to it.

With ``VSS_ADAPT_AUTO=1`` (or the older ``VSS_ADAPT_AUTO_CLIPS``) the worker also queues rounds by
itself when drift persists in the shared clip buffer (``service.auto_rounds``).

Run by a server (``VSS_WORKER=spawn``, the default: ``WorkerSupervisor`` starts it) or standalone
(``vss worker``) against model and buffer directories shared by several server replicas. Torch is
imported at the first job (or the first poll of the drift policy, which reads the registry), so an
idle worker without it costs next to nothing. On CPU it uses ``adapt_threads`` threads and a raised
niceness so that inference keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .adapt_jobs import AdaptJobStore
from .auto_rounds import AutoRounds
from .buffer import ClipBuffer
from .settings import WORKER_FIELDS, Settings  # WORKER_FIELDS: what a spawned worker inherits
from .storage import StoreError
from .store_buffer import open_clip_buffer
from .store_jobs import open_job_store
from .worker_jobs import JobFailure, JobRunner, load_val_clips

__all__ = ["JobFailure", "Worker", "clip_buffer", "job_store", "load_val_clips", "main", "serve_worker",
           "worker_settings_json"]

log = logging.getLogger("vss.worker")


def worker_settings_json(settings: Settings) -> str:
    """The settings a spawned worker needs, as the JSON its ``--settings-json`` flag takes."""
    values = settings.model_dump(mode="json", include=set(WORKER_FIELDS))
    values["adapt_job_dir"] = str(settings.job_root())
    return json.dumps(values)


def clip_buffer(settings: Settings) -> ClipBuffer:
    """The clip buffer in a directory or on an object store (``VSS_BUFFER_DIR=s3://...``)."""
    return open_clip_buffer(settings.buffer_dir, settings.buffer_max_clips, settings.buffer_max_bytes,
                            settings.buffer_heldout_fraction)


def job_store(settings: Settings) -> AdaptJobStore:
    """The adaptation job records in a directory or on an object store."""
    return open_job_store(settings.job_root(), settings.adapt_keep_jobs)


class Worker(JobRunner):
    """Claims and runs adaptation jobs (``JobRunner``) and runs the auto policy; ``run`` loops until
    ``stop_event`` is set (or the parent dies)."""

    def __init__(self, settings: Settings, *, jobs: AdaptJobStore | None = None, buffer: ClipBuffer | None = None,
                 registry: Any = None, thresholds: Any = None, parent_pid: int | None = None) -> None:
        self.settings = settings
        self.jobs = jobs or job_store(settings)
        self.buffer = buffer or clip_buffer(settings)
        self._registry = registry
        self.thresholds = thresholds  # adaptation.gate.GateThresholds; None: the gate's defaults
        self.parent_pid = parent_pid
        self.stop_event = threading.Event()
        self.identity = {"pid": os.getpid(), "host": socket.gethostname()}
        self.started = time.time()
        self.current: str | None = None
        self.device: str | None = None
        self._last_cancel_check = (0.0, False)
        self._store_error: str | None = None
        self._auto_error: str | None = None
        self.auto = AutoRounds(settings, self.jobs, self.buffer, lambda: self.registry)

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from .registry_api import open_registry  # imports torch: only once there is work

            self._registry = open_registry(self.settings.model_dir, self.settings.cache_dir)
        return self._registry

    # --- the loop ------------------------------------------------------------------------------
    def run(self, once: bool = False) -> None:
        """Poll for jobs until stopped; ``once``: return after the first job (or right away if none)."""
        beat = threading.Thread(target=self._heartbeat, name="vss-worker-heartbeat", daemon=True)
        beat.start()
        log.info("adaptation worker pid %d: jobs in %s, buffer %s, models %s", os.getpid(), self.jobs.root,
                 self.buffer.root, self.settings.model_dir)
        if self.auto.config is not None:
            log.info("auto policy on: %s", self.auto.config.to_dict())
        try:
            self._poll(lambda: bool(self.jobs.reap(self.settings.adapt_heartbeat_timeout_s)))  # a dead predecessor
            self._poll(lambda: bool(self.jobs.sweep() + self.buffer.sweep()))  # and its temp files
            self._poll(self.auto.start)  # the auto policy's counters and base reference, if it ran before
            while not self.stop_event.is_set():
                worked = self._poll(self.poll_once)
                if once:
                    return
                if not worked:
                    self.stop_event.wait(self.settings.adapt_poll_s)
        finally:
            self.stop_event.set()
            beat.join(5)
            self.jobs.forget_worker(self.identity["pid"], self.identity["host"])

    def _poll(self, step: Callable[[], bool]) -> bool:
        """Run one poll step; an object store that is down is waited out (logged once per distinct error)."""
        try:
            worked = step()
        except StoreError as e:
            if str(e) != self._store_error:
                log.error("adaptation worker cannot reach the store, waiting: %s", e)
            self._store_error = str(e)
            return False
        if self._store_error is not None:
            log.info("adaptation worker: the store answers again")
        self._store_error = None
        return worked

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _heartbeat(self) -> None:
        while True:
            if self._parent_gone():
                log.warning("the server that spawned this worker is gone; stopping")
                self.stop_event.set()
            try:
                self.jobs.beat({**self.identity, "started": self.started, "job": self.current,
                                "device": self.device})
                if self.current is not None:
                    self.jobs.set(self.current, heartbeat=round(time.time(), 3))
            except Exception:  # a full disk must not kill the heartbeat thread
                log.exception("worker heartbeat failed")
            if self.stop_event.wait(self.settings.adapt_heartbeat_s):
                return

    def poll_once(self) -> bool:
        """Run the next queued job (or an automatic one); False when there was nothing to do."""
        if not self.jobs.has_queued() and self._auto_job() is None:
            return False
        self._import_runtime()
        job = self.jobs.claim(self.identity)
        if job is None:
            return False  # another worker was quicker
        self.auto.record(self.run_job(job))
        return True

    def _import_runtime(self) -> None:
        """Import torch and the adaptation code *before* claiming a job: a cold import holds the GIL for
        seconds (tens of seconds on a loaded machine), which would starve the heartbeat of a claimed job."""
        import adaptation.sourcefree  # noqa: F401
        import models.checkpoint  # noqa: F401

        self.registry  # noqa: B018 - builds the registry (imports service.registry)

    def _auto_job(self) -> dict[str, Any] | None:
        """Queue a round when the auto policy (``service.auto_rounds``) says drift persists."""
        if not self.auto.enabled:
            return None
        try:
            return self.auto.poll()
        except StoreError:
            raise  # waited out by _poll
        except Exception as e:  # noqa: BLE001 - a policy error must not stop the worker: API jobs still run
            if str(e) != self._auto_error:
                log.exception("auto policy: the poll failed (logged once per distinct error)")
            self._auto_error = str(e)
            return None


def serve_worker(settings: Settings, parent_pid: int | None = None, once: bool = False) -> int:
    """Process entry: logging, niceness, signal handling, then the loop."""
    from .metrics import configure_logging

    configure_logging(settings.log_level, settings.json_logs(sys.stderr.isatty()))
    if settings.adapt_nice and hasattr(os, "nice"):
        try:
            os.nice(settings.adapt_nice)
        except OSError:
            log.warning("could not lower the worker's priority")
    worker = Worker(settings, parent_pid=parent_pid)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop_event.set())
    worker.run(once=once)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry of a spawned worker: ``--settings-json`` from the server, ``--parent-pid`` to follow it."""
    parser = argparse.ArgumentParser(prog="vss-worker", description="adaptation worker (spawned by `vss serve`)")
    parser.add_argument("--settings-json", default=None, help="settings overriding the VSS_* environment")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    args = parser.parse_args(argv)
    overrides = json.loads(args.settings_json) if args.settings_json else {}
    return serve_worker(Settings(**overrides), parent_pid=args.parent_pid, once=args.once)
