"""One adaptation job, as the worker runs it: load the parent and the clips, adapt, gate, publish.

``JobRunner`` is the job half of ``service.worker.Worker`` (the loop, the heartbeat and the auto policy
are in ``service.worker``/``service.auto_rounds``). A job from the API adapts the ACTIVE version on the
newest buffered clips and activates a candidate that passes the gate. A job the auto policy queued
(``request.auto``, ``service.auto_policy.plan_round``) names its parent and its clips (a drifted
cluster, its held-out clips gate the candidate) and says how to publish:

* ``mode: domain``: the version gets ``meta.domain`` (signature, name, clips) and ACTIVE does not move;
  the servers route matching streams to it;
* ``mode: chain``: a published candidate is activated, as an API job's;
* ``gate: off``: published even when the gate rejects it (a baseline; the job and the version still
  record what the gate said, with ``policy: off``). A candidate with non-finite weights is never published.

Validation clips (``VSS_VAL_DIR``): one ``.npz`` per clip with ``frames`` (T, H, W, 3) uint8 RGB,
``labels`` (T, H, W) uint8 (255 = ignore) and optionally ``flow`` (T, H, W, 2) float32 backward.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from . import crashpoints
from .adapt_jobs import CANCELLED, FAILED, GATING, PUBLISHED, REJECTED, AdaptJobStore
from .buffer import ClipBuffer, ClipDamaged, ClipNotFound
from .settings import Settings

log = logging.getLogger("vss.worker")


class JobFailure(Exception):
    """A job cannot go on: ``code`` and ``message`` go into the job's ``error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


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


def auto_meta(auto: dict[str, Any]) -> dict[str, Any]:
    """What an automatic round adds to its version's ``meta.json``: ``auto`` always, ``domain`` in domain mode."""
    domain = dict(auto.get("domain") or {})
    extra: dict[str, Any] = {"auto": {"round": auto.get("round"), "mode": auto.get("mode"), "gate": auto.get("gate"),
                                      "reset": bool(auto.get("reset")), **domain}}
    if auto.get("mode") == "domain":
        extra["domain"] = domain
    return extra


class JobRunner:
    """Runs claimed jobs to a final state (mixed into ``service.worker.Worker``)."""

    settings: Settings
    jobs: AdaptJobStore
    buffer: ClipBuffer
    thresholds: Any
    stop_event: threading.Event
    current: str | None
    device: str | None
    _last_cancel_check: tuple[float, bool]
    registry: Any

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

    def _parent(self, auto: dict[str, Any]) -> tuple[str, str | None]:
        """(parent, ACTIVE at the start): the round's parent when the auto policy named one, else ACTIVE."""
        from .registry import RegistryError

        active = self.registry.active()
        parent = auto.get("parent") or active
        if parent is None:
            raise JobFailure("no_active_model", f"the registry {self.registry.location} has no ACTIVE version")
        try:
            self.registry.check(parent)
        except RegistryError as e:
            raise JobFailure("parent_missing", f"the parent version {parent} is not in the registry: {e}") from e
        return parent, active

    def _execute(self, job: dict[str, Any]) -> dict[str, Any]:
        from adaptation.sourcefree import AdaptConfig, adapt
        from adaptation.trainer import Cancelled
        from models.checkpoint import load_checkpoint

        job_id, request = job["id"], job["request"]
        auto = dict(request.get("auto") or {})
        device = self._setup_torch()
        parent, active = self._parent(auto)
        model, meta = load_checkpoint(self.registry.path(parent))
        size = (int(meta["input_size"][0]), int(meta["input_size"][1]))
        train, heldout, clips_info = self._load_clips(size, bool(request.get("authenticated_only")),
                                                      request.get("clip_ids"))
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

        provenance = {"job_id": job_id, "trigger": job.get("trigger"), "clips": clips_info["ids"]}
        result = adapt(model, meta, train, cfg, parent_ref=parent, val=val, heldout=heldout or None,
                       on_log=lambda step, logs: self.jobs.log_losses(job_id, step, logs),
                       should_stop=lambda: self._should_stop(job_id), on_progress=on_progress,
                       provenance=provenance, labeled=val, **kwargs)
        if self._should_stop(job_id):
            raise Cancelled("cancelled while gating")
        report = _jsonable(result.report.to_dict())
        if result.train is None:  # adapt() turns NonFiniteLoss into a rejected report
            reason = "; ".join(result.report.reasons) or "training diverged"
            return self.jobs.finish(job_id, FAILED, ("non_finite_loss", reason), gate=report)
        gate_off = auto.get("gate") == "off"
        if gate_off:
            report["policy"] = "off"  # what the gate said stays in passed/reasons; the round publishes anyway
            result.meta["provenance"]["gate"] = report
        if auto:
            result.meta.update(auto_meta(auto))
        finite = report.get("metrics", {}).get("finite", True) is not False
        if not result.report.passed and not (gate_off and finite):
            return self.jobs.finish(job_id, REJECTED, gate=report)
        return self._publish(job_id, parent, active, result, report, activate=auto.get("mode") != "domain")

    def _publish(self, job_id: str, parent: str, active: str | None, result: Any, report: dict[str, Any],
                 activate: bool = True) -> dict[str, Any]:
        """Publish the candidate; with ``activate``, point ACTIVE at it unless ACTIVE moved since the job began."""
        self.jobs.set(job_id, stage="publishing")
        try:
            version = self.registry.publish(result.model.cpu(), result.meta, parent=parent)
        except OSError as e:  # disk full, permissions: the registry removed its staging directory
            raise JobFailure("publish_failed", f"publishing the candidate failed, nothing changed: {e}") from e
        activated = False
        if activate and self.registry.active() == active:  # an operator's activation since the start wins
            try:
                self.registry.activate(version)
            except OSError as e:
                raise JobFailure("activate_failed", f"published {version} but could not point ACTIVE at it "
                                                    f"(still {active}): {e}") from e
            activated = True
        elif activate:
            log.warning("ACTIVE moved away from %s during job %s; published %s without activating it",
                        active, job_id, version)
        fields: dict[str, Any] = {"version": version, "activated": activated, "gate": report}
        domain = result.meta.get("domain")
        if domain:
            fields["domain"] = {"name": domain.get("name"), "clips": domain.get("clips")}
        return self.jobs.finish(job_id, PUBLISHED, **fields)

    def _load_clips(self, size: tuple[int, int], authenticated_only: bool = False,
                    clip_ids: dict[str, list[str]] | None = None) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """(train, held-out, summary) from the newest ``adapt_max_clips`` buffered clips (only those that
        authenticated clients added, when ``authenticated_only``; only ``clip_ids``' train and held-out
        clips when given: an automatic round's cluster), with DIS flow."""
        from adaptation.clips import prepare_clip
        from models.flow import build_flow

        infos = [c for c in self.buffer.clips() if c.authenticated or not authenticated_only]
        if clip_ids is not None:
            wanted = set(clip_ids.get("train") or []) | set(clip_ids.get("heldout") or [])
            infos = [c for c in infos if c.id in wanted]
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
            raise JobFailure("not_enough_clips", f"the buffer holds {len(train)}{which} training clip(s)"
                                                 f"{' of this round' if clip_ids is not None else ''}; "
                                                 f"at least {self.settings.adapt_min_clips} are needed")
        summary = {"train": len(train), "heldout": len(held), "frames": sum(len(c) for c in train + held),
                   "authenticated_only": authenticated_only,
                   "heldout_from": "buffer" if held else "split", "ids": {"train": ids[False], "heldout": ids[True]}}
        return train, held, summary
