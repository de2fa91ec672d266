"""The adaptation worker: a separate process that turns buffered target clips into new model versions.

It polls the job directory (``service.adapt_jobs``), claims one job at a time, loads its *own* copy
of the registry's ACTIVE version (the servers' live engines are never touched), runs
``adaptation.sourcefree.adapt`` on the buffered clips, gates the candidate on held-out buffered
clips (and on labeled ``VSS_VAL_DIR`` clips when configured: then mIoU decides), and publishes +
activates only a candidate that passes. The servers' registry watchers then hot-swap it in.

Run by a server (``VSS_WORKER=spawn``, the default: ``WorkerSupervisor`` starts it) or standalone
(``vss worker``) against model and buffer directories shared by several server replicas. Torch is
imported at the first job, so an idle worker costs next to nothing. On CPU it uses
``adapt_threads`` threads and a raised niceness so that inference keeps serving.

Validation clips (``VSS_VAL_DIR``): one ``.npz`` per clip with ``frames`` (T, H, W, 3) uint8 RGB,
``labels`` (T, H, W) uint8 (255 = ignore) and optionally ``flow`` (T, H, W, 2) float32 backward.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from . import crashpoints
from .adapt_jobs import CANCELLED, FAILED, GATING, PUBLISHED, REJECTED, AdaptJobStore, JobConflict
from .buffer import ClipBuffer, ClipDamaged, ClipNotFound
from .settings import WORKER_FIELDS, Settings  # WORKER_FIELDS: what a spawned worker inherits
from .storage import StoreError
from .store_buffer import open_clip_buffer
from .store_jobs import open_job_store

log = logging.getLogger("vss.worker")


class JobFailure(Exception):
    """A job cannot go on: ``code`` and ``message`` go into the job's ``error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


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


def load_val_clips(directory: Path, size: tuple[int, int]) -> list[Any]:
    """Labeled validation clips (``*.npz``: frames, labels[, flow]) resized to the model input ``size``."""
    import numpy as np

    from adaptation.clips import prepare_clip

    files = sorted(Path(directory).glob("*.npz"))
    if not files:
        raise JobFailure("no_validation_clips", f"VSS_VAL_DIR {directory} holds no *.npz clip")
    clips = []
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as data:
                flow = data["flow"] if "flow" in data.files else None
                clips.append(prepare_clip(data["frames"], size, flows=flow, labels=data["labels"]))
        except (OSError, KeyError, ValueError) as e:
            raise JobFailure("bad_validation_clip", f"validation clip {path.name}: {e}") from e
    return clips


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON (numpy scalars become numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


class Worker:
    """Claims and runs adaptation jobs; ``run`` loops until ``stop_event`` is set (or the parent dies)."""

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
        try:
            self._poll(lambda: bool(self.jobs.reap(self.settings.adapt_heartbeat_timeout_s)))  # a dead predecessor
            self._poll(lambda: bool(self.jobs.sweep() + self.buffer.sweep()))  # and its temp files
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
        self.run_job(job)
        return True

    def _import_runtime(self) -> None:
        """Import torch and the adaptation code *before* claiming a job: a cold import holds the GIL for
        seconds (tens of seconds on a loaded machine), which would starve the heartbeat of a claimed job."""
        import adaptation.sourcefree  # noqa: F401
        import models.checkpoint  # noqa: F401

        self.registry  # noqa: B018 - builds the registry (imports service.registry)

    def _auto_job(self) -> dict[str, Any] | None:
        """Queue a job when ``adapt_auto_clips`` clips arrived since the last job (the auto policy)."""
        s = self.settings
        if s.adapt_auto_clips <= 0:
            return None
        since = self.jobs.last_created() or 0.0
        if self.buffer.count_since(since) < s.adapt_auto_clips:
            return None
        if sum(not c.heldout for c in self.buffer.clips()) < s.adapt_min_clips:
            return None
        try:
            job = self.jobs.create({"method": s.adapt_auto_method, "steps": s.adapt_auto_steps}, trigger="auto")
        except JobConflict:
            return None
        log.info("auto adaptation: %d new clips since the last job; queued job %s", s.adapt_auto_clips, job["id"])
        return job

    # --- one job -------------------------------------------------------------------------------
    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run a claimed job to a final state and return the job record."""
        from adaptation.trainer import Cancelled, NonFiniteLoss

        job_id = job["id"]
        self.current = job_id
        self._last_cancel_check = (0.0, False)
        started = time.monotonic()
        try:
            return self._execute(job)
        except Cancelled:
            if self.jobs.cancel_requested(job_id):
                return self.jobs.finish(job_id, CANCELLED)
            return self.jobs.finish(job_id, FAILED, ("worker_stopped", "the worker was stopped during the job"))
        except NonFiniteLoss as e:
            return self.jobs.finish(job_id, FAILED, ("non_finite_loss", f"training diverged: {e}"))
        except JobFailure as e:
            return self.jobs.finish(job_id, FAILED, (e.code, e.message))
        except Exception as e:  # noqa: BLE001 - any failure is recorded on the job, the worker lives on
            log.exception("adaptation job %s failed", job_id)
            return self.jobs.finish(job_id, FAILED, ("internal_error", f"{type(e).__name__}: {e}"))
        finally:
            self.current = None
            log.info("adaptation job %s ended (state %s) after %.1f s", job_id,
                     self._state(job_id), time.monotonic() - started)

    def _state(self, job_id: str) -> str:
        try:
            return str(self.jobs.get(job_id)["state"])
        except Exception:  # noqa: BLE001 - only for a log line
            return "unknown"

    def _should_stop(self, job_id: str) -> bool:
        if self.stop_event.is_set():
            return True
        now = time.monotonic()
        checked, value = self._last_cancel_check
        if now - checked >= 0.2:  # the loop asks every step; reading the job file 5x/s is plenty
            value = self.jobs.cancel_requested(job_id)
            self._last_cancel_check = (now, value)
        return value

    def _setup_torch(self) -> str:
        import torch

        device = self.settings.adapt_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise JobFailure("no_cuda", "VSS_ADAPT_DEVICE=cuda but torch sees no CUDA device")
        if device == "cpu":
            torch.set_num_threads(self.settings.adapt_threads)
        self.device = device
        return device

    def _execute(self, job: dict[str, Any]) -> dict[str, Any]:
        from adaptation.sourcefree import AdaptConfig, adapt
        from adaptation.trainer import Cancelled
        from models.checkpoint import load_checkpoint

        job_id, request = job["id"], job["request"]
        device = self._setup_torch()
        parent = self.registry.active()
        if parent is None:
            raise JobFailure("no_active_model", f"the registry {self.registry.location} has no ACTIVE version")
        model, meta = load_checkpoint(self.registry.path(parent))
        size = (int(meta["input_size"][0]), int(meta["input_size"][1]))
        train, heldout, clips_info = self._load_clips(size, bool(request.get("authenticated_only")))
        val = load_val_clips(self.settings.val_dir, size) if self.settings.val_dir is not None else None
        clips_info["val"] = len(val) if val else 0
        self.jobs.set(job_id, parent=parent, clips=clips_info, stage="adapting", device=device)
        crashpoints.reached("adapt_running")
        kwargs: dict[str, Any] = {"device": device}
        if self.thresholds is not None:
            kwargs["thresholds"] = self.thresholds
        cfg = AdaptConfig(method=request["method"], options=dict(request.get("options") or {}),
                          steps=int(request["steps"]), lr=request.get("lr"),
                          time_budget_s=min(float(request.get("time_budget_s") or math.inf),
                                            self.settings.adapt_max_time_s),
                          seed=int(request.get("seed", 0)), batch_size=_optional_int(request.get("batch_size")),
                          labeled_frames=int(request.get("labeled_frames") or 0))

        def on_progress(stage: str, info: dict[str, Any]) -> None:
            if stage == "gate":
                self.jobs.set(job_id, state=GATING, stage="gate")
            elif stage != "done":
                self.jobs.set(job_id, stage=stage)

        result = adapt(model, meta, train, cfg, parent_ref=parent, val=val, heldout=heldout or None,
                       on_log=lambda step, logs: self.jobs.log_losses(job_id, step, logs),
                       should_stop=lambda: self._should_stop(job_id), on_progress=on_progress,
                       provenance={"job_id": job_id, "trigger": job.get("trigger"), "clips": clips_info["ids"]},
                       labeled=val, **kwargs)
        if self._should_stop(job_id):
            raise Cancelled("cancelled while gating")
        report = _jsonable(result.report.to_dict())
        if not result.report.passed:
            if result.train is None:  # adapt() turns NonFiniteLoss into a rejected report
                reason = "; ".join(result.report.reasons) or "training diverged"
                return self.jobs.finish(job_id, FAILED, ("non_finite_loss", reason), gate=report)
            return self.jobs.finish(job_id, REJECTED, gate=report)
        return self._publish(job_id, parent, result, report)

    def _publish(self, job_id: str, parent: str, result: Any, report: dict[str, Any]) -> dict[str, Any]:
        self.jobs.set(job_id, stage="publishing")
        try:
            version = self.registry.publish(result.model.cpu(), result.meta, parent=parent)
        except OSError as e:  # disk full, permissions: the registry removed its staging directory
            raise JobFailure("publish_failed", f"publishing the candidate failed, nothing changed: {e}") from e
        activated = self.registry.active() == parent  # an operator's activation since the start wins
        if activated:
            try:
                self.registry.activate(version)
            except OSError as e:
                raise JobFailure("activate_failed", f"published {version} but could not point ACTIVE at it "
                                                    f"(still {parent}): {e}") from e
        else:
            log.warning("ACTIVE moved away from %s during job %s; published %s without activating it",
                        parent, job_id, version)
        return self.jobs.finish(job_id, PUBLISHED, version=version, activated=activated, gate=report)

    def _load_clips(self, size: tuple[int, int],
                    authenticated_only: bool = False) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """(train, held-out, summary) from the newest ``adapt_max_clips`` buffered clips (only those that
        authenticated clients added, when ``authenticated_only``), with DIS flow."""
        from adaptation.clips import prepare_clip
        from models.flow import build_flow

        infos = [c for c in self.buffer.clips() if c.authenticated or not authenticated_only]
        infos = infos[-self.settings.adapt_max_clips:]
        flow = build_flow(self.settings.flow, str(self.settings.raft_weights) if self.settings.raft_weights else None)
        loaded: dict[bool, list[Any]] = {False: [], True: []}
        ids: dict[bool, list[str]] = {False: [], True: []}
        for info in infos:
            try:
                frames = self.buffer.load(info.id)
            except ClipNotFound:
                continue  # evicted since it was listed
            except ClipDamaged as e:
                log.warning("skipping a buffered clip: %s", e)
                continue
            loaded[info.heldout].append(prepare_clip(frames, size, flow_provider=flow))
            ids[info.heldout].append(info.id)
        train, held = loaded[False], loaded[True]
        if len(train) < self.settings.adapt_min_clips:
            which = " authenticated" if authenticated_only else ""
            raise JobFailure("not_enough_clips", f"the buffer holds {len(train)}{which} training clip(s); "
                                                 f"at least {self.settings.adapt_min_clips} are needed")
        summary = {"train": len(train), "heldout": len(held), "frames": sum(len(c) for c in train + held),
                   "authenticated_only": authenticated_only,
                   "heldout_from": "buffer" if held else "split", "ids": {"train": ids[False], "heldout": ids[True]}}
        return train, held, summary


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
