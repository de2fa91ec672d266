"""End to end: a real server (uvicorn on loopback) and its spawned worker with VSS_ADAPT_AUTO=1 start a round by
themselves once clips of a shifted style arrive, and publish a domain version (ACTIVE stays) or reject it
with the gate's reasons; the server shows the policy in ``GET /v1/models/active`` and ``/metrics``.

Tiny random-init model at 64x128, BN-statistics method, 2 steps: a few seconds of CPU after the worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import httpx

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.service.live import live_server
from tests.waiting import wait_until

API_KEY = "auto-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SIZE = (64, 128)
FINAL = ("published", "rejected", "failed", "cancelled")


def post_clip(http: httpx.Client, style: str, seed: int) -> dict[str, Any]:
    from adaptation.synth import generate_clip

    clip = generate_clip(style, frames=3, size=SIZE, seed=seed)
    files = [("images", (f"{i}.png", cv2.imencode(".png", f[..., ::-1])[1].tobytes(), "image/png"))
             for i, f in enumerate(clip.frames)]
    r = http.post("/v1/clips?clip_frames=3", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    [added] = r.json()["added"]
    return added


def auto(http: httpx.Client) -> dict[str, Any]:
    return http.get("/v1/models/active").json()["auto"]


def test_a_shifted_style_starts_an_automatic_round(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    settings = Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir=tmp_path / "buffer",
                        job_dir=tmp_path / "jobs", cache_dir=tmp_path / "cache", demo_model=None, api_key=API_KEY,
                        device="cpu", intra_op_threads=1, registry_poll_ms=100, flow="dis-ultrafast",
                        worker="spawn", adapt_threads=1, adapt_min_clips=2, adapt_poll_s=0.1,
                        buffer_heldout_fraction=0.3, adapt_auto=True, adapt_auto_min_clips=3,
                        adapt_auto_interval_s=3600.0, adapt_auto_method="bn", adapt_auto_steps=2)
    app = create_app(settings)
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        for seed in range(3):
            post_clip(http, "source", seed)
        state = wait_until(lambda: (s := auto(http)).get("base_reference") and s, 240,
                           "the worker's first poll (base reference from the earliest clips)")
        assert state["enabled"] and state["config"]["domains"] and state["rounds"]["started"] == 0
        assert state["decision"]["drifted"] == 0  # source-like clips: no drift
        assert http.get("/v1/adapt").json()["jobs"] == []

        held = train = 0
        for seed in range(100, 160):  # fog until the cluster has 2 training clips and 1 held-out clip
            info = post_clip(http, "fog", seed)
            held, train = held + info["heldout"], train + (not info["heldout"])
            if held >= 1 and train >= 2 and held + train >= 3:
                break
        jobs = wait_until(lambda: [j for j in http.get("/v1/adapt").json()["jobs"]
                                   if j["trigger"] == "auto" and j["state"] in FINAL], 240,
                          "an automatic round to finish")
        job = jobs[0]
        assert job["state"] in ("published", "rejected"), job
        assert job["request"]["auto"]["mode"] == "domain" and job["parent"] == "v0001"
        models = http.get("/v1/models").json()
        assert models["active"] == "v0001"  # domain mode: ACTIVE stays the base
        if job["state"] == "published":
            assert job["version"] == "v0002" and job["activated"] is False and job["domain"]["name"] == "auto-1"
            meta = ModelRegistry(tmp_path / "models").meta("v0002")
            assert meta["domain"]["signature_version"] == 1 and meta["domain"]["clips"] >= 3
        else:
            assert job["gate"]["reasons"], job
        state = wait_until(lambda: (s := auto(http))["rounds"][job["state"]] == 1 and s, 60, "the outcome counted")
        assert state["rounds"]["started"] == 1 and state["last_outcome"]["job"] == job["id"]
        metrics = http.get("/metrics").text
        assert 'vss_auto_rounds_total{outcome="started"} 1.0' in metrics
        assert f'vss_auto_rounds_total{{outcome="{job["state"]}"}} 1.0' in metrics
        assert "vss_drifted_clips " in metrics
