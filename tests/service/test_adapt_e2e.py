"""End to end: a real server (uvicorn on loopback) with its spawned worker adapts the demo model to a
target-style stream, publishes and hot-swaps the new version mid-stream, and rejects a sabotaged job.

Runs on the bundled demo model (``service/demo_model``; ``VSS_E2E_MODEL`` points elsewhere) at a
reduced input size of 128x256 so that the whole story takes about a minute of CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import ClientConnection, connect

from models.config import DEMO_MODEL_DIR
from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.service.live import live_server
from tests.waiting import wait_until
from service.stream_codec import raw_frame

REPO = Path(__file__).resolve().parents[2]
MODEL_SIZE = (128, 256)  # (h, w) the demo model runs at here (fully convolutional; trained at 256x512)
STYLE = "fog"  # a photometric shift that the cheapest method (BN statistics) largely undoes
SCENES = range(1, 9)  # one 8-frame scene per buffered clip
EVAL_SEED = 99
API_KEY = "e2e-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FINAL = ("published", "rejected", "failed", "cancelled")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo checkpoint whose metadata asks for the smaller input size."""
    source = Path(os.environ.get("VSS_E2E_MODEL") or DEMO_MODEL_DIR)
    if not (source / "meta.json").is_file():
        pytest.skip(f"no demo model at {source} (train one: python -m adaptation.make_demo -o DIR)")
    target = tmp_path_factory.mktemp("demo") / "model"
    shutil.copytree(source, target)
    meta = json.loads((target / "meta.json").read_text())
    meta["input_size"] = list(MODEL_SIZE)
    (target / "meta.json").write_text(json.dumps(meta))
    return target




class Stream:
    """A websocket client that sends one frame at a time and reads its reply."""

    def __init__(self, ws: ClientConnection, frames: np.ndarray) -> None:
        self.ws, self.frames, self.sent = ws, frames, 0
        self.replies: list[dict[str, Any]] = []

    def step(self) -> dict[str, Any]:
        self.ws.send(raw_frame(self.frames[self.sent % len(self.frames)]))
        self.sent += 1
        meta = json.loads(self.ws.recv(timeout=60))
        assert meta["type"] == "frame", meta
        assert isinstance(self.ws.recv(timeout=60), bytes)  # the label map
        self.replies.append(meta)
        return meta


def poll_job(http: httpx.Client, stream: Stream, location: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll a job to its end while the stream keeps going (one frame per poll)."""
    def ended() -> dict[str, Any] | None:
        job = http.get(location).json()
        if job["state"] in FINAL:
            return job
        stream.step()
        return None
    return wait_until(ended, timeout, f"the job {location} to end", 0.2)


def miou(checkpoint: Path, clip: Any) -> float:
    from adaptation.clip_eval import evaluate_clips
    from adaptation.synth import CLASSES
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return float(evaluate_clips(model, [clip], CLASSES)["miou"])


def test_stream_adapt_publish_hot_swap_and_reject_sabotage(tmp_path: Path, demo_model: Path) -> None:
    from adaptation.synth import generate_clip

    registry = ModelRegistry(tmp_path / "models")
    registry.import_dir(demo_model, activate=True)
    settings = Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir=tmp_path / "buffer",
                        job_dir=tmp_path / "jobs", cache_dir=tmp_path / "cache", demo_model=None, api_key=API_KEY,
                        device="cpu", intra_op_threads=1, registry_poll_ms=100, flow="dis-ultrafast",
                        worker="spawn", adapt_threads=1, buffer_clip_frames=8, buffer_clip_every=8,
                        adapt_min_clips=2)
    frames = np.concatenate([generate_clip(STYLE, frames=8, size=MODEL_SIZE, seed=s).frames for s in SCENES])
    app = create_app(settings)
    with live_server(app, None) as host, httpx.Client(base_url=f"http://{host}", timeout=30) as http, \
            connect(f"ws://{host}/v1/stream", additional_headers=AUTH) as ws:  # the key: its clips may train
        ws.send(json.dumps({"format": "rle", "collect": True}))
        assert json.loads(ws.recv(timeout=30))["model_version"] == "v0001"
        stream = Stream(ws, frames)
        for _ in range(len(frames)):  # every frame lands in a buffered clip (one clip per scene)
            stream.step()
        assert app.state.adaptation.collector.flush(60)
        assert http.get("/v1/clips").json()["clips"] == len(SCENES)

        r = http.post("/v1/adapt", json={"method": "bn", "steps": 10}, headers=AUTH)
        assert r.status_code == 202, r.text
        job = poll_job(http, stream, r.headers["location"])
        assert job["state"] == "published", json.dumps(job, indent=1)
        new = job["version"]
        assert (new, job["parent"], job["activated"]) == ("v0002", "v0001", True)

        def switched() -> bool:  # the swap may already have happened while polling
            if stream.replies[-1]["model_version"] == new:
                return True
            stream.step()
            return False
        wait_until(switched, 60, "the stream to switch to the new version", 0)
        replies = stream.replies
        first_new = next(i for i, m in enumerate(replies) if m["model_version"] == new)
        assert replies[first_new]["keyframe"] is True  # a fresh keyframe right after the swap
        assert all(m["model_version"] == "v0001" for m in replies[:first_new])
        assert all(m["model_version"] == new for m in replies[first_new:])
        assert [m["frame"] for m in stream.replies] == list(range(stream.sent))  # no frame lost or dropped
        assert http.get("/v1/models/active").json()["version"] == new

        sabotage = http.post("/v1/adapt", json={"method": "tent", "steps": 5, "lr": 1e3}, headers=AUTH)
        assert sabotage.status_code == 202, sabotage.text
        bad = poll_job(http, stream, sabotage.headers["location"])
        assert bad["state"] == "rejected", json.dumps(bad, indent=1)
        assert bad["gate"]["reasons"] and bad["version"] is None
        assert registry.active() == new and registry.versions() == ["v0001", "v0002"]
        assert http.get("/v1/models/active").json()["version"] == new
        assert http.get("/healthz").status_code == 200

    held_out = generate_clip(STYLE, frames=8, size=MODEL_SIZE, seed=EVAL_SEED)
    parent, adapted = miou(registry.path("v0001"), held_out), miou(registry.path(new), held_out)
    print(f"\nheld-out {STYLE} mIoU: parent v0001 {parent:.1f} -> adapted {new} {adapted:.1f}")
    assert adapted > parent + 3.0
