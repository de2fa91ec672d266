"""The product story end to end, at the demo model's real input size: a server streams a target-style
video, its worker adapts the model on the buffered clips, the gate passes it, and the stream swaps.

    .venv/bin/python -m bench.live_adapt [--style fog] [--method stpl] [--budget 120] [--threads 1]

Runs ``vss`` under uvicorn in its own process with the spawned worker process (``VSS_WORKER=spawn``,
``--threads`` torch threads each), starting from the bundled demo model. One websocket streams 3
clips of the style (16 frames at 256x512, the adaptation seeds of bench/adaptation.py) with
``collect`` on; then ``POST /v1/adapt`` runs ``--method`` for ``--budget`` wall-clock seconds while a
second websocket keeps streaming other frames. Prints the job's end state, its steps and gate
metrics, what the stream saw (frames answered, lost, the swap and its keyframe, the longest gap),
and the mIoU of the parent and of the published version on 4 held-out clips of the style (the test
seeds of bench/adaptation.py). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.sync.client import connect

from adaptation.clip_eval import evaluate_clips
from adaptation.synth import CLASSES, generate_clip
from bench.service import server_process
from models.checkpoint import load_checkpoint
from service.registry import ModelRegistry
from models.config import DEMO_MODEL_DIR
from service.stream_codec import raw_frame

SIZE = (256, 512)
ADAPT_SEEDS, TEST_SEEDS, STREAM_SEED = 50_000, 60_000, 80_000
KEY = "bench-key"
FINAL = ("published", "rejected", "failed", "cancelled")


def send(ws: Any, frame: np.ndarray) -> dict[str, Any]:
    """One frame out, its JSON reply and label map in."""
    ws.send(raw_frame(frame))
    meta = json.loads(ws.recv(timeout=120))
    if meta.get("type") != "frame":
        raise RuntimeError(f"unexpected reply {meta}")
    ws.recv(timeout=120)
    return {**meta, "t": time.perf_counter()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--style", default="fog")
    ap.add_argument("--method", default="stpl")
    ap.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds of adaptation")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the worker")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    registry = ModelRegistry(tmp / "models")
    registry.import_dir(DEMO_MODEL_DIR, activate=True)
    env = {"VSS_MODEL_DIR": str(tmp / "models"), "VSS_BUFFER_DIR": str(tmp / "buffer"),
           "VSS_JOB_DIR": str(tmp / "jobs"), "VSS_CACHE_DIR": str(tmp / "cache"), "VSS_API_KEY": KEY,
           "VSS_DEVICE": "cpu", "VSS_FLOW": "dis-ultrafast", "VSS_REGISTRY_POLL_MS": "200",
           "VSS_BUFFER_CLIP_FRAMES": "16", "VSS_BUFFER_CLIP_EVERY": "16", "VSS_ADAPT_MIN_CLIPS": "2",
           "VSS_ADAPT_THREADS": str(args.threads), "VSS_WORKER": "spawn"}
    clips = [generate_clip(args.style, 16, SIZE, seed=s).frames for s in range(ADAPT_SEEDS, ADAPT_SEEDS + 3)]
    live = generate_clip(args.style, 16, SIZE, seed=STREAM_SEED).frames
    auth = {"Authorization": f"Bearer {KEY}"}
    with server_process(env, args.threads) as (port, _), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None) as ws:
            ws.send(json.dumps({"format": "rle", "collect": True}))
            json.loads(ws.recv(timeout=60))
            for frame in np.concatenate(clips):
                send(ws, frame)
        deadline = time.monotonic() + 60
        while http.get("/v1/clips").json()["clips"] < len(clips):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the buffer holds {http.get('/v1/clips').json()} after 60 s")
            time.sleep(0.2)
        replies: list[dict[str, Any]] = []
        with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None) as ws:
            ws.send(json.dumps({"format": "rle", "collect": False}))
            json.loads(ws.recv(timeout=60))
            t0 = time.perf_counter()
            r = http.post("/v1/adapt", json={"method": args.method, "steps": 5000, "time_budget_s": args.budget},
                          headers=auth)
            r.raise_for_status()
            job = r.json()
            while job["state"] not in FINAL or (job["state"] == "published"
                                                and replies[-1]["model_version"] != job["version"]):
                replies.append(send(ws, live[len(replies) % len(live)]))
                job = http.get(f"/v1/adapt/{job['id']}").json()
                if time.perf_counter() - t0 > args.budget + 600:
                    raise RuntimeError(f"job still {job['state']} after {args.budget + 600:.0f} s")
            for _ in range(3):
                replies.append(send(ws, live[len(replies) % len(live)]))
    parent, meta = load_checkpoint(DEMO_MODEL_DIR)
    test = [generate_clip(args.style, 12, SIZE, seed=s) for s in range(TEST_SEEDS, TEST_SEEDS + 4)]
    before = evaluate_clips(parent, test, CLASSES)["miou"]
    after = None
    if job["state"] == "published":
        after = evaluate_clips(load_checkpoint(registry.path(job["version"]))[0], test, CLASSES)["miou"]
    versions = [m["model_version"] for m in replies]
    swap = next((i for i, v in enumerate(versions) if v != versions[0]), None)
    gaps = np.diff([m["t"] for m in replies])
    print(f"style {args.style}, method {args.method}, budget {args.budget:.0f} s wall, {args.threads} thread(s)")
    metrics = {k: v for k, v in (job.get("gate") or {}).get("metrics", {}).items() if "share" not in k}
    print(f"job: {job['state']} -> {job.get('version')}; last logged step {job.get('losses', [{}])[-1].get('step')}; "
          f"gate {json.dumps(metrics)}")
    if job.get("gate", {}).get("reasons"):
        print("gate reasons: " + "; ".join(job["gate"]["reasons"]))
    print(f"stream during the job: {len(replies)} frames answered, frame indices contiguous: "
          f"{[m['frame'] for m in replies] == list(range(len(replies)))}, median gap {np.median(gaps) * 1000:.0f} ms, "
          f"longest {gaps.max() * 1000:.0f} ms")
    if swap is not None:
        print(f"swap at reply {swap}: {versions[0]} -> {versions[swap]}, keyframe {replies[swap]['keyframe']}")
    published = f" -> published {after:.1f}" if after is not None else ""
    print(f"held-out {args.style} mIoU: parent {before:.1f}{published}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
