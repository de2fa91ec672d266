"""The automatic-round policy (service/auto_policy.py) on signatures: drift, interval, clusters, parents, reset."""

from __future__ import annotations

import numpy as np
import pytest

from models.signature import LENGTH, SCALE, clip_signature
from service.auto_policy import (AutoConfig, ClipSig, consistent_prefix, greedy_clusters, is_drifted,
                                 mean_signature, plan_count_round, plan_round)

BASE = np.full(LENGTH, 0.5)
CFG = AutoConfig(min_clips=4, interval_s=60.0, distance=2.5, domains=True, method="bn", steps=3, min_train=2)


def style(offset: float, direction: int = 0) -> np.ndarray:
    """A domain centre ``offset`` within-domain standard deviations from BASE (along one of two directions)."""
    step = np.asarray(SCALE) * offset
    if direction:
        step = step * np.where(np.arange(LENGTH) % 2, 1.0, -1.0)
    return BASE + step


def clips(centre: np.ndarray, n: int, start: float, prefix: str, heldout_every: int = 3,
          seed: int = 0) -> list[ClipSig]:
    rng = np.random.default_rng(seed)
    return [ClipSig(f"{prefix}{i}", start + i, i % heldout_every == heldout_every - 1,
                    centre + rng.normal(0, 0.3, LENGTH) * np.asarray(SCALE)) for i in range(n)]


def plan(buffered: list[ClipSig], last: float | None = None, now: float = 1000.0, started: int = 0,
         cfg: AutoConfig = CFG, domains: dict | None = None, active: str = "v0001") -> dict:
    served = {active: BASE, **(domains or {})}
    decision = plan_round(buffered, served, domains or {}, active, "v0001", last, started, now, cfg)
    return {"decision": decision, "request": decision.request}


def test_source_like_clips_start_no_round() -> None:
    source = clips(BASE, 12, 0.0, "s")
    out = plan(source)
    assert out["request"] is None and out["decision"].drifted == 0
    assert not any(is_drifted(c.signature, {"v0001": BASE}, 2.5) for c in source)


def test_enough_drifted_clips_start_one_round_not_before_the_interval() -> None:
    source, fog = clips(BASE, 6, 0.0, "s"), clips(style(6.0), 6, 100.0, "f")
    assert plan(source + fog[:3])["request"] is None  # 3 drifted clips < 4
    request = plan(source + fog)["request"]
    assert request is not None
    assert set(request["clip_ids"]["train"]) | set(request["clip_ids"]["heldout"]) == {c.id for c in fog}
    assert request["auto"]["parent"] == "v0001" and request["auto"]["mode"] == "domain"
    assert request["auto"]["domain"]["clips"] == 6 and len(request["auto"]["domain"]["signature"]) == LENGTH
    # A round was created at t=104.5: the same clips are not new any more; new ones must wait for the interval.
    more = clips(style(6.0), 5, 110.0, "g", seed=1)
    waiting = plan(source + fog + more, last=104.5, now=120.0)
    assert waiting["request"] is None and waiting["decision"].next_eligible == pytest.approx(164.5)
    assert "interval" in waiting["decision"].reason
    assert plan(source + fog + more, last=104.5, now=170.0)["request"] is not None
    assert plan(source + fog, last=200.0, now=1000.0)["request"] is None  # nothing drifted since the last round


def test_the_round_trains_on_the_cluster_with_the_new_drifted_clips() -> None:
    fog = clips(style(6.0), 5, 100.0, "f")
    night = clips(style(6.0, direction=1), 2, 90.0, "n")
    buffered = sorted(clips(BASE, 4, 0.0, "s") + night + fog, key=lambda c: c.created)
    out = plan(buffered)
    assert [len(k.clips) for k in greedy_clusters([c for c in buffered if c.id[0] != "s"], 2.5)] == [2, 5]
    request = out["request"]
    assert set(request["clip_ids"]["train"]) | set(request["clip_ids"]["heldout"]) == {c.id for c in fog}
    assert set(request["clip_ids"]["heldout"]) == {c.id for c in fog if c.heldout}
    assert out["decision"].clusters[0]["new"] == 5 and out["decision"].clusters[1]["size"] == 2
    spread = clips(style(6.0), 2, 100.0, "f") + clips(style(6.0, 1), 2, 102.0, "n")
    assert plan(spread)["request"] is None  # 4 drifted clips, but no cluster holds 4
    no_heldout = [ClipSig(c.id, c.created, False, c.signature) for c in fog]
    assert "0 held-out" in plan(no_heldout)["decision"].reason  # the gate needs a held-out clip of the cluster


def test_periodic_reset_and_the_parent_of_a_round() -> None:
    fog = clips(style(6.0), 6, 100.0, "f")
    chain = AutoConfig(**{**CFG.to_dict(), "domains": False, "reset_every": 3, "min_train": 2})
    for started, parent, reset in ((0, "v0005", False), (1, "v0005", False), (2, "v0001", True), (5, "v0001", True)):
        request = plan(fog, cfg=chain, started=started, active="v0005")["request"]
        assert (request["auto"]["parent"], request["auto"]["reset"], request["auto"]["round"]) == (parent, reset,
                                                                                                    started + 1)
        assert request["auto"]["mode"] == "chain"
    # Domain mode: a routable domain version near the cluster is the parent, a far one is not.
    near = {"v0003": mean_signature(fog)}
    assert plan(fog, domains=near)["request"] is None  # ... and then the clips are not drifted at all
    far = {"v0004": style(6.0, direction=1)}
    assert plan(fog, domains=far)["request"]["auto"]["parent"] == "v0001"
    # The parent rule itself: the nearest domain version within the threshold of the cluster's mean.
    close = {"v0006": style(3.5)}  # 2.5 from the fog clips' centre
    decision = plan_round(fog, {"v0001": BASE}, close, "v0001", "v0001", None, 0, 1000.0,
                          AutoConfig(**{**CFG.to_dict(), "distance": 2.6}))
    assert decision.request is not None and decision.request["auto"]["parent"] == "v0006"


def test_count_mode_is_the_older_trigger() -> None:
    cfg = AutoConfig(mode="count", min_clips=3, min_train=2, method="bn", steps=1)
    assert plan_count_round(2, 5, cfg).request is None
    assert plan_count_round(3, 1, cfg).request is None
    assert plan_count_round(3, 2, cfg).request == {"method": "bn", "steps": 1}


def test_real_signatures_separate_a_shifted_style_from_the_source() -> None:
    from adaptation.synth import generate_clip

    def signed(name: str, n: int, start: float) -> list[ClipSig]:
        return [ClipSig(f"{name}{i}", start + i, False,
                        clip_signature(generate_clip(name, frames=4, size=(64, 128), seed=i).frames)) for i in range(n)]

    source = signed("source", 4, 0.0)
    base = consistent_prefix(source + signed("fog", 2, 10.0), 2.5)
    assert [c.id for c in base] == [c.id for c in source]
    reference = {"v0001": mean_signature(base)}
    fog = signed("fog", 4, 20.0)
    assert not any(is_drifted(c.signature, reference, 2.5) for c in signed("source", 3, 30.0)[1:])
    assert all(is_drifted(c.signature, reference, 2.5) for c in fog)
