"""The automatic-round policy as pure functions: which buffered clips drifted, how they cluster, and
whether (and on what) to start a round. No I/O: ``service.auto_rounds`` feeds it from the clip buffer,
the registry and the job store, and the worker runs the job it plans.

Terms (README "Automatic rounds"):

* a clip's *signature* is ``models.signature.clip_signature`` of its frames; distances are in
  within-domain standard deviations (``models.signature.distance``);
* the *served references* are the signatures of what the servers serve: in domain mode the base
  version and every routable domain version (``meta.domain``), in chain mode the ACTIVE version;
* a clip is *drifted* when it is farther than ``distance`` from every served reference;
* drift *persists* when at least ``min_clips`` drifted clips arrived since the last round, in one
  cluster (greedy clustering by distance to a cluster's mean), and ``interval_s`` has passed since the
  last round. Then a round is planned on that cluster's clips (its held-out clips gate the candidate).

``count`` mode is the older trigger (``VSS_ADAPT_AUTO_CLIPS``): every new clip counts, one round per
``min_clips`` new clips, trained on the newest buffered clips as an API job would be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DRIFT, COUNT = "drift", "count"
MAX_CLUSTERS_SHOWN = 8  # clusters a decision lists (most new drifted clips first)


@dataclass(frozen=True)
class AutoConfig:
    """What the worker's auto policy does (``auto_config`` builds it from the settings)."""

    mode: str = DRIFT  # "drift" (VSS_ADAPT_AUTO=1) or "count" (the older VSS_ADAPT_AUTO_CLIPS trigger)
    min_clips: int = 4  # drifted clips (count mode: new clips) since the last round
    interval_s: float = 60.0  # least seconds between two rounds
    distance: float = 2.5  # a clip farther than this from every served reference is drifted
    domains: bool = True  # publish domain versions (ACTIVE unchanged) instead of activating a chain
    gate: str = "stat"  # "stat": publish only what passes the gate; "off": always publish (a baseline)
    reset_every: int = 0  # every K-th round starts from the base version (RDumb); 0: never
    method: str = "tent"
    steps: int = 100
    max_clips: int = 32  # newest clips of the cluster one round uses
    min_train: int = 2  # training clips a round needs
    min_heldout: int = 1  # held-out clips of the cluster a round needs (drift mode: the gate scores the cluster)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "min_clips": self.min_clips, "interval_s": self.interval_s,
                "distance": self.distance, "domains": self.domains, "gate": self.gate,
                "reset_every": self.reset_every, "method": self.method, "steps": self.steps}


@dataclass(frozen=True)
class ClipSig:
    """One buffered clip as the policy sees it."""

    id: str
    created: float
    heldout: bool
    signature: np.ndarray


@dataclass
class Cluster:
    """Clips whose signatures lie within ``distance`` of the cluster's running mean."""

    clips: list[ClipSig] = field(default_factory=list)
    total: np.ndarray | None = None

    @property
    def centroid(self) -> np.ndarray:
        assert self.total is not None
        return self.total / len(self.clips)

    def add(self, clip: ClipSig) -> None:
        sig = np.asarray(clip.signature, dtype=np.float64)
        self.total = sig.copy() if self.total is None else self.total + sig
        self.clips.append(clip)


@dataclass
class Decision:
    """The outcome of one poll: ``request`` is the job request of a planned round (None: no round)."""

    reason: str
    drifted: int = 0  # drifted clips in the buffer
    drifted_new: int = 0  # ... that arrived since the last round
    clusters: list[dict[str, Any]] = field(default_factory=list)
    next_eligible: float | None = None
    request: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"action": "round" if self.request is not None else "wait", "reason": self.reason,
                "drifted": self.drifted, "drifted_new": self.drifted_new, "clusters": self.clusters,
                "next_eligible": self.next_eligible}


def distance(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """``models.signature.distance`` (imported here: ``models`` loads torch, which an idle worker must not)."""
    from models.signature import distance as scaled

    return scaled(a, b)


Signatures = Mapping[str, Sequence[float] | np.ndarray]


def nearest_reference(sig: np.ndarray, references: Signatures) -> tuple[str, float] | None:
    """(name, distance) of the reference closest to ``sig``; None without references."""
    best: tuple[str, float] | None = None
    for name, ref in references.items():
        d = distance(sig, ref)
        if best is None or d < best[1]:
            best = (name, d)
    return best


def is_drifted(sig: np.ndarray, references: Mapping[str, Sequence[float] | np.ndarray], threshold: float) -> bool:
    """Farther than ``threshold`` from every reference (no reference at all: drifted)."""
    near = nearest_reference(sig, references)
    return near is None or near[1] > threshold


def greedy_clusters(clips: Sequence[ClipSig], threshold: float) -> list[Cluster]:
    """Assign each clip, in order, to the cluster whose mean is nearest if within ``threshold``, else start one."""
    clusters: list[Cluster] = []
    for clip in clips:
        best: tuple[Cluster, float] | None = None
        for cluster in clusters:
            d = distance(clip.signature, cluster.centroid)
            if best is None or d < best[1]:
                best = (cluster, d)
        if best is not None and best[1] <= threshold:
            best[0].add(clip)
        else:
            cluster = Cluster()
            cluster.add(clip)
            clusters.append(cluster)
    return clusters


def consistent_prefix(clips: Sequence[ClipSig], threshold: float, limit: int = 8) -> list[ClipSig]:
    """The earliest clip and the following ones within ``threshold`` of it (at most ``limit``): the base
    reference when the base version carries no signature of its own."""
    if not clips:
        return []
    first = clips[0]
    return [c for c in clips if distance(c.signature, first.signature) <= threshold][:limit]


def mean_signature(clips: Sequence[ClipSig]) -> list[float]:
    return [round(float(v), 6) for v in np.mean([np.asarray(c.signature, dtype=np.float64) for c in clips], axis=0)]


def _summary(cluster: Cluster, new_ids: set[str], references: Mapping[str, Any]) -> dict[str, Any]:
    near = nearest_reference(cluster.centroid, references)
    return {"size": len(cluster.clips), "new": sum(c.id in new_ids for c in cluster.clips),
            "train": sum(not c.heldout for c in cluster.clips), "heldout": sum(c.heldout for c in cluster.clips),
            "nearest": near[0] if near else None, "distance": round(near[1], 2) if near else None}


def plan_round(clips: Sequence[ClipSig], served: Mapping[str, Sequence[float] | np.ndarray],
               domain_versions: Mapping[str, Sequence[float] | np.ndarray], active: str | None, base: str | None,
               last_round_at: float | None, rounds_started: int, now: float, cfg: AutoConfig) -> Decision:
    """Decide whether to start a round now (drift mode).

    ``clips``: buffered clips oldest first; ``served``: the served references; ``domain_versions``: the
    routable domain versions (parent candidates); ``active``/``base``: the ACTIVE and the base version;
    ``last_round_at``: when the last round was created (None: never); ``rounds_started``: rounds so far.
    """
    drifted = [c for c in clips if is_drifted(c.signature, served, cfg.distance)]
    new = [c for c in drifted if last_round_at is None or c.created > last_round_at]
    new_ids = {c.id for c in new}
    clusters = sorted(greedy_clusters(drifted, cfg.distance), key=lambda k: -sum(c.id in new_ids for c in k.clips))
    summaries = [_summary(k, new_ids, served) for k in clusters]
    decision = Decision("", len(drifted), len(new), summaries[:MAX_CLUSTERS_SHOWN])
    eligible = None if last_round_at is None else last_round_at + cfg.interval_s
    decision.next_eligible = eligible
    if len(new) < cfg.min_clips:
        decision.reason = f"{len(new)} drifted clip(s) since the last round; {cfg.min_clips} needed"
        return decision
    if eligible is not None and now < eligible:
        decision.reason = "drift persists; waiting for the least interval between rounds (next_eligible)"
        return decision
    best = clusters[0]
    members = best.clips[-cfg.max_clips:]
    if summaries[0]["new"] < cfg.min_clips:
        decision.reason = (f"{len(new)} drifted clips are spread over {len(clusters)} clusters; none holds "
                           f"{cfg.min_clips} new ones")
        return decision
    train = [c.id for c in members if not c.heldout]
    heldout = [c.id for c in members if c.heldout]
    if len(train) < cfg.min_train or len(heldout) < cfg.min_heldout:
        decision.reason = (f"the drifted cluster holds {len(train)} training and {len(heldout)} held-out clip(s); "
                           f"{cfg.min_train} and {cfg.min_heldout} needed")
        return decision
    number = rounds_started + 1
    reset = cfg.reset_every > 0 and number % cfg.reset_every == 0
    from models.signature import VERSION as SIGNATURE_VERSION

    signature = mean_signature(members)
    parent = active
    if reset and base is not None:
        parent = base
    elif cfg.domains:
        near = nearest_reference(np.asarray(signature), domain_versions)
        if near is not None and near[1] <= cfg.distance:
            parent = near[0]
    decision.request = {
        "method": cfg.method, "steps": cfg.steps, "clip_ids": {"train": train, "heldout": heldout},
        "auto": {"round": number, "mode": "domain" if cfg.domains else "chain", "gate": cfg.gate, "reset": reset,
                 "parent": parent, "domain": {"signature": signature, "signature_version": SIGNATURE_VERSION,
                                              "name": f"auto-{number}", "clips": len(members)}}}
    decision.reason = (f"drift persists: {summaries[0]['new']} new drifted clips in one cluster (nearest served "
                       f"{summaries[0]['nearest']} at {summaries[0]['distance']}); round {number} from {parent}"
                       + (" (periodic reset)" if reset else ""))
    return decision


def plan_count_round(new_clips: int, train_clips: int, cfg: AutoConfig) -> Decision:
    """The older trigger: a round after ``min_clips`` new clips, on the newest buffered clips."""
    decision = Decision("", drifted_new=new_clips)
    if new_clips < cfg.min_clips:
        decision.reason = f"{new_clips} new clip(s) since the last job; {cfg.min_clips} needed"
    elif train_clips < cfg.min_train:
        decision.reason = f"the buffer holds {train_clips} training clip(s); {cfg.min_train} needed"
    else:
        decision.reason = f"{new_clips} new clips since the last job"
        decision.request = {"method": cfg.method, "steps": cfg.steps}
    return decision
