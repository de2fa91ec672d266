"""The worker's auto policy: drift detection on the shared clip buffer and automatic rounds.

``AutoRounds.poll`` runs on every worker poll when ``VSS_ADAPT_AUTO=1`` (or the older
``VSS_ADAPT_AUTO_CLIPS`` trigger is set). It computes the signature of each new buffered clip once
(cached by clip id), compares it with the signatures of the versions being served, asks
``service.auto_policy.plan_round`` whether drift persists, and queues a job (trigger ``auto``) that
names the clips of the drifted cluster, the domain signature and the parent. It writes what it decided
to ``auto.json`` in the job store (``AdaptJobStore.write_auto_state``: atomic, on a directory or an
object store) so that every server shows it (``GET /v1/models/active`` → ``auto``, ``/metrics``).

There is one worker per fleet and the buffer is shared by every replica, so the trigger is fleet-wide
by construction: clips sampled by any server count.

Served references: a version's own signature is ``meta.domain.signature`` (a domain version) or
``meta.auto.signature`` (a chain-mode round). The base version's is the signature in its stored source
statistics (issue 13 item 4, ``models.checkpoint.load_source_stats``) when it has them; otherwise the
policy takes the signature of the *earliest* buffered clips (the first clip and the following ones
within the drift distance of it) as the base's reference, once, and keeps it in ``auto.json``
(``base_reference``), so a worker restart does not move it. That fallback assumes the service first
sees the domain its base model was trained for; a deployment that starts on a shifted camera should
clear the buffer or stream source-like video first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .adapt_jobs import CANCELLED, FAILED, PUBLISHED, REJECTED, AdaptJobStore, JobConflict
from .auto_policy import COUNT, DRIFT, AutoConfig, ClipSig, Decision, consistent_prefix, mean_signature
from .auto_policy import plan_count_round, plan_round
from .buffer import ClipBuffer, ClipDamaged, ClipNotFound
from .settings import Settings
from .storage import StoreError

log = logging.getLogger("vss.worker.auto")

SIGNATURES_PER_POLL = 64  # new clips signed per poll (a restart over a full buffer catches up over a few polls)
OUTCOMES = (PUBLISHED, REJECTED, FAILED, CANCELLED)


def auto_config(settings: Settings) -> AutoConfig | None:
    """The policy the settings ask for: drift (``adapt_auto``), the older count trigger, or none."""
    s = settings
    if s.adapt_auto:
        return AutoConfig(DRIFT, s.adapt_auto_min_clips, s.adapt_auto_interval_s, s.adapt_auto_distance,
                          s.adapt_domains, s.adapt_gate, s.adapt_reset_every, s.adapt_auto_method,
                          s.adapt_auto_steps, s.adapt_max_clips, s.adapt_min_clips)
    if s.adapt_auto_clips > 0:
        return AutoConfig(COUNT, s.adapt_auto_clips, 0.0, domains=False, gate="stat", method=s.adapt_auto_method,
                          steps=s.adapt_auto_steps, max_clips=s.adapt_max_clips, min_train=s.adapt_min_clips)
    return None


def auto_enabled(settings: Settings) -> bool:
    return auto_config(settings) is not None


def version_signature(meta: dict[str, Any]) -> list[float] | None:
    """A version's own domain signature: ``meta.domain`` (domain mode) or ``meta.auto`` (chain mode)."""
    from models.signature import VERSION

    for key in ("domain", "auto"):
        entry = meta.get(key)
        if isinstance(entry, dict) and entry.get("signature_version") == VERSION and entry.get("signature"):
            return [float(v) for v in entry["signature"]]
    return None


def routable(meta: dict[str, Any]) -> bool:
    """A domain version the servers may route to, unless it is retired (``Registry.retired``, checked by the
    caller: retiring writes a registry marker, a version's meta never changes)."""
    entry = meta.get("domain")
    return isinstance(entry, dict) and version_signature(meta) is not None


def stored_signature(registry: Any, version: str) -> list[float] | None:
    """The source-statistics signature stored with ``version``'s checkpoint (issue 13 item 4), or None (none
    stored, or one of another signature definition)."""
    from models.checkpoint import load_source_stats
    from models.signature import LENGTH, VERSION

    try:
        stats = load_source_stats(registry.path(version))
    except StoreError:
        raise  # waited out by the worker; read again afterwards
    except (ValueError, LookupError, OSError) as e:  # CheckpointError is a ValueError
        log.warning("auto policy: cannot read the source statistics of %s: %s", version, e)
        return None
    if stats is None or stats.signature_version != VERSION or len(stats.signature) != LENGTH:
        return None
    return [round(float(v), 6) for v in stats.signature]


class AutoRounds:
    """Signatures of buffered clips, the served references, and the decision of each poll."""

    def __init__(self, settings: Settings, jobs: AdaptJobStore, buffer: ClipBuffer,
                 registry: Callable[[], Any]) -> None:
        self.config = auto_config(settings)
        self.jobs, self.buffer, self._registry = jobs, buffer, registry
        self.signatures: dict[str, np.ndarray] = {}
        self._metas: dict[str, dict[str, Any] | None] = {}  # versions never change: read each meta once
        self._stored: dict[str, list[float] | None] = {}
        self._written: dict[str, Any] | None = None
        self.rounds = dict.fromkeys(("started",) + OUTCOMES, 0)
        self.base_reference: dict[str, Any] | None = None
        self.base: str | None = None
        self.last_round: dict[str, Any] | None = None
        self.last_outcome: dict[str, Any] | None = None
        self.decision: dict[str, Any] = {}
        self.references: dict[str, str] = {}
        self.started = False

    def start(self) -> bool:
        """Continue from the state a previous worker wrote (counters, base reference); with the policy off,
        mark a state left by an earlier run as off (servers show the file). Called by the worker's first poll."""
        previous = self.jobs.read_auto_state() or {}
        self.started = True
        if self.config is None:
            if previous.get("enabled"):
                self.jobs.write_auto_state({"enabled": False, "rounds": previous.get("rounds"),
                                            "updated": round(time.time(), 3)})
            return False
        self.rounds.update({k: int(v) for k, v in (previous.get("rounds") or {}).items() if k in self.rounds})
        self.base_reference = previous.get("base_reference")
        self.base = previous.get("base")
        self.last_round, self.last_outcome = previous.get("last_round"), previous.get("last_outcome")
        return False

    @property
    def enabled(self) -> bool:
        return self.config is not None

    # --- one poll ------------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> dict[str, Any] | None:
        """Decide, publish the state, and queue a round when one is due; returns the queued job."""
        if self.config is None:
            return None
        if not self.started:
            self.start()
        now = time.time() if now is None else now
        last = self.jobs.last_created()
        if self.config.mode == COUNT:
            infos = self.buffer.clips()
            decision = plan_count_round(sum(c.created > (last or 0.0) for c in infos),
                                        sum(not c.heldout for c in infos), self.config)
        else:
            decision = self._plan(now, last)
        job = None
        if decision.request is not None:
            job = self._queue(decision, now)
        self.decision = {**decision.to_dict(), "at": round(now, 3), **({"job": job["id"]} if job else {})}
        self._save(now)
        return job

    def _plan(self, now: float, last_round_at: float | None) -> Decision:
        cfg = self.config
        assert cfg is not None
        clips = self._signed_clips()
        registry = self._registry()
        active = registry.active()
        if self.base is None:
            self.base = active
        stored = self._source_signature(registry, self.base) if self.base else None
        if stored is not None:
            self.base_reference = {"signature": stored, "from": f"source statistics of {self.base}"}
        elif self.base_reference is None and clips:
            first = consistent_prefix(clips, cfg.distance, limit=max(cfg.min_clips, 2))
            self.base_reference = {"signature": mean_signature(first), "clips": [c.id for c in first],
                                   "from": "earliest buffered clips"}
        base_sig = self.base_reference["signature"] if self.base_reference else None
        domains: dict[str, list[float]] = {}
        retired = registry.retired()  # a retired domain version serves no stream: its style drifts again
        for version in registry.versions():
            meta = self._meta(registry, version)
            if meta is not None and cfg.domains and version not in retired and routable(meta):
                domains[version] = version_signature(meta) or []
        served: dict[str, list[float]] = dict(domains)
        own = self._meta(registry, active) if active else None
        active_sig = (version_signature(own) if own else None) or base_sig
        if active is not None and active_sig is not None:
            served[active] = active_sig
        self.references = {name: "domain" for name in domains}
        if active in served and active not in domains:
            self.references[active] = "own" if own and version_signature(own) else "base_reference"
        if not served:
            return Decision("no reference yet: the buffer holds no clip")
        return plan_round(clips, served, domains, active, self.base, last_round_at, self.rounds["started"], now, cfg)

    def _signed_clips(self) -> list[ClipSig]:
        from models.signature import clip_signature

        infos = self.buffer.clips()
        live = {c.id for c in infos}
        for gone in set(self.signatures) - live:
            del self.signatures[gone]
        todo = [c for c in infos if c.id not in self.signatures][-SIGNATURES_PER_POLL:]
        for info in todo:
            try:
                self.signatures[info.id] = clip_signature(self.buffer.load(info.id))
            except ClipNotFound:
                continue
            except ClipDamaged as e:
                log.warning("auto policy: skipping a damaged clip: %s", e)
                self.signatures[info.id] = np.full(0, np.nan)  # never retried; filtered below
        return [ClipSig(c.id, c.created, c.heldout, self.signatures[c.id]) for c in infos
                if c.id in self.signatures and self.signatures[c.id].size]

    def _meta(self, registry: Any, version: str) -> dict[str, Any] | None:
        if version not in self._metas:
            try:
                self._metas[version] = registry.meta(version)
            except StoreError:
                raise  # the store is down: the worker waits it out, then this version is read again
            except (ValueError, LookupError, OSError) as e:  # a damaged or removed version: not a reference
                log.warning("auto policy: cannot read the metadata of %s: %s", version, e)
                self._metas[version] = None
        return self._metas[version]

    def _source_signature(self, registry: Any, version: str) -> list[float] | None:
        """The signature in the source statistics stored with ``version`` (issue 13 item 4), once per version."""
        if version not in self._stored:
            self._stored[version] = stored_signature(registry, version)
        return self._stored[version]

    def _queue(self, decision: Decision, now: float) -> dict[str, Any] | None:
        assert decision.request is not None
        try:
            job = self.jobs.create(decision.request, trigger="auto")
        except JobConflict as e:
            decision.reason = f"drift persists but job {e.job['id']} is {e.job['state']}; waiting for it"
            decision.request = None
            return None
        self.rounds["started"] += 1
        auto = decision.request.get("auto") or {}
        self.last_round = {"job": job["id"], "at": round(now, 3), "parent": auto.get("parent"),
                           "reset": auto.get("reset", False), "domain": (auto.get("domain") or {}).get("name")}
        log.info("auto policy: %s; queued job %s", decision.reason, job["id"])
        return job

    # --- outcomes and state --------------------------------------------------------------------
    def record(self, job: dict[str, Any]) -> None:
        """Count the final state of an automatic round the worker ran."""
        if self.config is None or job.get("trigger") != "auto" or job.get("state") not in OUTCOMES:
            return
        if not self.started:
            self.start()
        self.rounds[job["state"]] += 1
        gate = job.get("gate") or {}
        self.last_outcome = {"job": job["id"], "state": job["state"], "version": job.get("version"),
                             "parent": job.get("parent"), "gate_passed": gate.get("passed"),
                             "reasons": gate.get("reasons") or ([job["error"]["message"]] if job.get("error") else []),
                             "at": job.get("finished")}
        self._save(time.time())

    def state(self, now: float) -> dict[str, Any]:
        assert self.config is not None
        return {"enabled": True, "config": self.config.to_dict(), "decision": self.decision,
                "rounds": dict(self.rounds), "clips_signed": len(self.signatures), "base": self.base,
                "base_reference": self.base_reference, "references": self.references,
                "last_round": self.last_round, "last_outcome": self.last_outcome,
                "worker": {"pid": os.getpid()}, "updated": round(now, 3)}

    def _save(self, now: float) -> None:
        state = self.state(now)
        stable = {k: v for k, v in state.items() if k != "updated"}
        stable["decision"] = {k: v for k, v in self.decision.items() if k != "at"}
        if stable == self._written:
            return
        self.jobs.write_auto_state(state)
        self._written = stable


def auto_state(jobs: AdaptJobStore) -> dict[str, Any]:
    """What servers answer about the auto policy (``GET /v1/models/active`` → ``auto``): the state the worker
    wrote last (the worker's settings decide, not the server's: with ``VSS_WORKER=external`` only the worker
    may have ``VSS_ADAPT_AUTO``), ``{"enabled": false}`` when none; ``error`` when the store cannot be read."""
    try:
        state = jobs.read_auto_state()
    except OSError as e:  # the object store is down (StoreError) or the directory unreadable
        return {"enabled": None, "error": f"cannot read the auto policy's state: {e}"}
    return state if state is not None else {"enabled": False}


class AutoCollector:
    """``vss_auto_rounds_total{outcome}``, ``vss_drifted_clips`` and ``vss_drifted_clips_new`` at scrape time,
    from the state the worker wrote (so every replica exports the fleet's numbers)."""

    def __init__(self, jobs: AdaptJobStore) -> None:
        self.jobs = jobs

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = auto_state(self.jobs)
        rounds = CounterMetricFamily("vss_auto_rounds", "Automatic adaptation rounds of the worker's auto policy: "
                                     "started, and by outcome", labels=["outcome"])
        for outcome in ("started",) + OUTCOMES:
            rounds.add_metric([outcome], float((state.get("rounds") or {}).get(outcome, 0)))
        yield rounds
        decision = state.get("decision") or {}
        yield GaugeMetricFamily("vss_drifted_clips", "Buffered clips farther than VSS_ADAPT_AUTO_DISTANCE from every "
                                "served version", value=float(decision.get("drifted", 0)))
        yield GaugeMetricFamily("vss_drifted_clips_new", "Drifted clips that arrived since the last round",
                                value=float(decision.get("drifted_new", 0)))
        yield GaugeMetricFamily("vss_auto_enabled", "1 when the worker's auto policy is on",
                                value=float(bool(state.get("enabled"))))
