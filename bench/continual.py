"""Continual adaptation through the real server: a long stream of changing styles, automatic rounds,
and the mIoU of what was actually served, per configuration (issue 13 item 6).

    .venv/bin/python -m bench.continual [--minutes 32] [--configs none,always,reset,cotta,full]
    .venv/bin/python -m bench.continual --minutes 2 --configs none,full      # a short smoke run

The stream: segments of synthetic styles in an order that returns to earlier ones (source, fog,
night, source, noise-blur, fog, recolor, source), each made of generated clips (``adaptation.synth``,
its own seed per clip, labels from the generator) at the demo model's size. Frame i counts as
i / ``--camera-fps`` seconds of stream time (a slow camera); the stream is replayed faster than real
time, paced to ``--segment-wall-s`` wall seconds per segment (or as fast as the server answers), so
that automatic rounds have time to run within a segment. One websocket streams it all with
``collect`` on; every reply's label map is scored against the generator's labels at the reply's
``model_version``.

Each configuration is a fresh server (``vss`` under uvicorn, its own process, with the spawned
worker; 1 torch thread each by default) starting from the bundled demo model, with the environment
of ``config_env``. After the stream: the rounds from ``GET /v1/adapt``, and every published round's
parent and candidate scored on held-out labeled clips of the style of the segment the round started
in (false publishes; rejected candidates are not kept by the service, so rejected-but-better is
counted only where a candidate exists). Writes ``continual.json``, ``continual.md`` and
``continual.png`` to ``--out`` and prints the table and the target checks. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.sync.client import connect

from bench.continual_plot import plot
from bench.continual_report import HELDOUT_SEED, SEGMENTS, Plan, ServedScore, checks, compare, gate_errors, \
    make_plan, rounds, table
from bench.service import server_process

CONFIGS = ("none", "always", "reset", "cotta", "full")
KEY = "bench-key"


def config_env(name: str, args: argparse.Namespace) -> dict[str, str]:
    """The server environment of a configuration (on top of ``base_env``); see README "Toward continual
    adaptation" for what each variable does."""
    auto = {"VSS_ADAPT_AUTO": "1", "VSS_ADAPT_AUTO_METHOD": args.method,
            "VSS_ADAPT_AUTO_INTERVAL_S": str(args.interval), "VSS_ADAPT_AUTO_MIN_CLIPS": str(args.min_clips),
            "VSS_ADAPT_AUTO_STEPS": "5000"}
    if args.distance is not None:
        auto["VSS_ADAPT_AUTO_DISTANCE"] = str(args.distance)
    plain = {**auto, "VSS_ADAPT_DOMAINS": "0", "VSS_ADAPT_GATE": "off"}
    envs = {"none": {"VSS_ADAPT_AUTO": "0"},
            "always": plain,
            "reset": {**plain, "VSS_ADAPT_RESET_EVERY": str(args.reset_every)},
            "cotta": {**plain, "VSS_ADAPT_AUTO_METHOD": "cotta"},
            "full": {**auto, "VSS_ADAPT_DOMAINS": "1", "VSS_ADAPT_GATE": "stat"}}
    if name not in envs:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    return {**envs[name], **dict(kv.split("=", 1) for kv in args.env)}


def base_env(work: Path, args: argparse.Namespace) -> dict[str, str]:
    return {"VSS_MODEL_DIR": str(work / "models"), "VSS_BUFFER_DIR": str(work / "buffer"),
            "VSS_JOB_DIR": str(work / "jobs"), "VSS_CACHE_DIR": str(work / "cache"), "VSS_API_KEY": KEY,
            "VSS_DEVICE": "cpu", "VSS_ADAPT_DEVICE": "cpu", "VSS_FLOW": "dis-ultrafast",
            "VSS_REGISTRY_POLL_MS": "200", "VSS_WORKER_THREADS": "1", "VSS_INTRA_OP_THREADS": str(args.threads),
            "VSS_BUFFER_CLIP_FRAMES": str(args.buffer_frames), "VSS_BUFFER_CLIP_EVERY": str(args.buffer_every),
            "VSS_ADAPT_MIN_CLIPS": "2", "VSS_ADAPT_MAX_CLIPS": str(args.max_clips),
            "VSS_ADAPT_MAX_TIME_S": str(args.budget),  # rounds give no time budget: this limit is theirs
            "VSS_ADAPT_THREADS": str(args.threads), "VSS_WORKER": "spawn", "VSS_COLLECT_RATE_CLIPS": "100000"}


def generate_stream(plan: Plan, cache: Path) -> list[Path]:
    """Generate (or reuse) every clip of the stream as ``.npz`` (frames, labels), in stream order."""
    from adaptation.synth import generate_clip

    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for seg, style in enumerate(plan.segments):
        for k in range(plan.clips_per_segment):
            seed = plan.clip_seed(seg, k)
            path = cache / f"{style}_{seed}_{plan.clip_frames}_{plan.size[0]}x{plan.size[1]}.npz"
            if not path.is_file():
                clip = generate_clip(style, plan.clip_frames, plan.size, seed=seed)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, frames=clip.frames, labels=clip.labels)
                tmp.replace(path)
            paths.append(path)
    return paths


def send(ws: Any, frame: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """One frame out; its JSON reply and its label map in."""
    from service.stream_codec import decode_labels, raw_frame

    ws.send(raw_frame(frame))
    meta = json.loads(ws.recv(timeout=300))
    if meta.get("type") != "frame":
        raise RuntimeError(f"unexpected reply {meta}")
    return meta, decode_labels(ws.recv(timeout=300), "rle")


def stream(port: int, plan: Plan, paths: list[Path], segment_wall_s: float, num_classes: int,
           log: Any) -> tuple[ServedScore, list[tuple[float, float]], dict[str, Any]]:
    """Stream every clip over one websocket with ``collect`` on (with the key: an authenticated client may
    feed the buffer); score each reply as it comes."""
    score = ServedScore(plan, num_classes)
    timeline: list[tuple[float, float]] = []
    per_frame = segment_wall_s / plan.frames_per_segment if segment_wall_s > 0 else 0.0
    lost = 0
    with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None,
                 additional_headers={"Authorization": f"Bearer {KEY}"}) as ws, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        ws.send(json.dumps({"format": "rle", "collect": True}))
        json.loads(ws.recv(timeout=60))
        t0, frame = time.monotonic(), 0
        for path in paths:
            data = np.load(path)
            for img, label in zip(data["frames"], data["labels"], strict=True):
                wait = t0 + frame * per_frame - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # pacing the replay, not waiting for a condition
                timeline.append((time.time(), frame / plan.camera_fps))
                meta, pred = send(ws, img)
                lost += int(meta["frame"] != frame)
                score.add(frame, pred, label, str(meta.get("model_version")))
                frame += 1
                if frame % plan.frames_per_segment == 0:
                    seg = plan.segment_of(frame - 1)
                    jobs = http.get("/v1/adapt").json()["jobs"]
                    log(f"  segment {seg + 1} {plan.segments[seg]}: served mIoU "
                        f"{score.summary()['segments'][seg]['miou']}, {time.monotonic() - t0:.0f} s wall, "
                        f"jobs {dict(sorted(_count(j['state'] for j in jobs).items()))}")
        listing = http.get("/v1/adapt").json()
        active = http.get("/v1/models/active").json()
    return score, timeline, {"adapt": listing, "active": active, "frames_out_of_order": lost}


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


class HeldOut:
    """Held-out labeled clips per style and cached mIoU per (version, style), for scoring rounds."""

    def __init__(self, plan: Plan, clips: int, registry: Any) -> None:
        self.plan, self.n, self.registry = plan, clips, registry
        self.clips: dict[str, list[Any]] = {}
        self.cache: dict[tuple[str, str], float] = {}

    def miou(self, version: str, style: str) -> float:
        from adaptation.clip_eval import evaluate_clips
        from adaptation.synth import CLASSES, STYLES, generate_clip
        from models.checkpoint import load_checkpoint

        if (version, style) not in self.cache:
            if style not in self.clips:
                base = HELDOUT_SEED + 1000 * sorted(STYLES).index(style)
                self.clips[style] = [generate_clip(style, 8, self.plan.size, seed=base + k) for k in range(self.n)]
            model, _ = load_checkpoint(self.registry.path(version))
            result = evaluate_clips(model.eval(), self.clips[style], CLASSES)
            value = result["miou"]
            assert isinstance(value, float)
            self.cache[(version, style)] = round(value, 2)
        return self.cache[(version, style)]


def score_rounds(summary: dict[str, Any], held: HeldOut) -> list[dict[str, Any]]:
    """Parent and candidate of every published round on held-out clips of its segment's style (with the gate
    off a round publishes what the gate rejected, so both of the gate's errors can be counted there)."""
    out = []
    for r in summary["list"]:
        if r["state"] != "published" or not r["parent"] or not r["version"] or r["style"] is None:
            if r["state"] == "rejected":
                out.append({**r, "parent_miou": None, "candidate_miou": None})
            continue
        out.append({**r, "parent_miou": held.miou(r["parent"], r["style"]),
                    "candidate_miou": held.miou(r["version"], r["style"])})
    return out


def run_config(name: str, args: argparse.Namespace, plan: Plan, paths: list[Path], root: Path,
               log: Any) -> dict[str, Any]:
    import torch

    from adaptation.synth import CLASSES
    from service.registry import ModelRegistry
    from service.settings import BUNDLED_DEMO_MODEL

    work = root / name
    registry = ModelRegistry(work / "models")
    registry.import_dir(BUNDLED_DEMO_MODEL, activate=True)
    env = {**base_env(work, args), **config_env(name, args)}
    log(f"{name}: {' '.join(f'{k}={v}' for k, v in config_env(name, args).items())}")
    t0 = time.monotonic()
    with server_process(env, args.threads) as (port, _):
        score, timeline, final = stream(port, plan, paths, args.segment_wall_s, len(CLASSES), log)
    wall = time.monotonic() - t0
    torch.set_num_threads(args.threads)
    summary = rounds(final["adapt"]["jobs"], timeline, plan)
    scored = score_rounds(summary, HeldOut(plan, args.heldout_clips, registry))
    extra = {k: v for k, v in final["adapt"].items() if k != "jobs"}
    return {"env": config_env(name, args), "wall_s": round(wall, 1), "served": score.summary(), "rounds": summary,
            "gate_rounds": scored, "gate_errors": gate_errors(scored), "adapt_status": extra,
            "auto_rounds": (final["active"].get("auto") or {}).get("rounds"),  # the worker's own counters
            "active": final["active"], "frames_out_of_order": final["frames_out_of_order"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=32.0, help="stream time in minutes (at least; whole clips)")
    ap.add_argument("--camera-fps", type=float, default=0.5, help="stream seconds per frame = 1 / this")
    ap.add_argument("--segment-wall-s", type=float, default=50.0,
                    help="wall seconds per segment (replay pacing; 0: as fast as the server answers)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--method", default="tent", help="round method of always, reset and full")
    ap.add_argument("--budget", type=float, default=20.0, help="wall seconds of training per round")
    ap.add_argument("--interval", type=float, default=20.0, help="least seconds between rounds")
    ap.add_argument("--min-clips", type=int, default=2, help="new drifted clips before a round")
    ap.add_argument("--max-clips", type=int, default=6, help="newest buffered clips a round uses")
    ap.add_argument("--distance", type=float, default=None, help="VSS_ADAPT_AUTO_DISTANCE (default: the server's)")
    ap.add_argument("--reset-every", type=int, default=3, help="VSS_ADAPT_RESET_EVERY of the reset configuration")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    ap.add_argument("--size", default="256x512", help="frame size HxW")
    ap.add_argument("--clip-frames", type=int, default=16, help="frames per generated clip (a plot window)")
    ap.add_argument("--buffer-frames", type=int, default=8, help="frames per buffered clip (VSS_BUFFER_CLIP_FRAMES)")
    ap.add_argument("--buffer-every", type=int, default=8, help="a buffered clip every this many frames "
                    "(VSS_BUFFER_CLIP_EVERY)")
    ap.add_argument("--heldout-clips", type=int, default=3, help="held-out clips per style for scoring rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the worker")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/continual"))
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown or "none" not in args.configs:
        ap.error(f"--configs: choose from {', '.join(CONFIGS)}, including none (the base); got {args.configs}")
    bad = [kv for kv in args.env if "=" not in kv or not kv.startswith("VSS_")]
    if bad:
        ap.error(f"--env takes VSS_KEY=VALUE, got {bad[0]!r}")
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
        args.size = (h, w)
    except ValueError:
        ap.error(f"--size takes HxW, e.g. 256x512, got {args.size!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    plan = make_plan(args.minutes, args.camera_fps, args.clip_frames, args.size, SEGMENTS)
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-continual-"))

    def log(text: str) -> None:
        print(text, flush=True)

    load = os.getloadavg()
    log(f"plan: {json.dumps(plan.to_dict())}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    t0 = time.monotonic()
    paths = generate_stream(plan, root / "stream")
    log(f"stream generated in {time.monotonic() - t0:.0f} s")
    results = {name: run_config(name, args, plan, paths, root, log) for name in args.configs}
    settings = {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()}
    report: dict[str, Any] = {
        "plan": plan.to_dict(), "settings": settings,
        "load_average": {"start": list(load), "end": list(os.getloadavg())}, "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - t0, 1), "configs": results, "compare": compare(results),
        "checks": checks(results)}
    # the gate's verdict is recorded in every configuration (with the gate off the round publishes anyway)
    every = gate_errors([r for res in results.values() for r in res["gate_rounds"]])
    report["gate_errors_all_configs"] = every
    if every["published_scored"] or every["rejected_scored"]:
        report["checks"][f"gate, all configurations: no passed candidate worse than its parent on held-out clips "
                         f"({every['published_worse']} of {every['published_scored']}; "
                         f"{every['rejected_better']} of {every['rejected_scored']} failed ones better)"] = \
            every["published_worse"] == 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continual.json").write_text(json.dumps(report, indent=1))
    text = table(results)
    (args.out / "continual.md").write_text(text + "\n")
    plot(results, args.out / "continual.png")
    log("\n" + text + "\n")
    for name, res in results.items():
        r, g = res["rounds"], res["gate_errors"]
        log(f"{name}: rounds {r['started']} started, {r['published']} published, {r['rejected']} rejected, "
            f"{r['failed']} failed, {r['unfinished']} unfinished; held-out: {g['published_worse']} of "
            f"{g['published_scored']} gate-passed rounds worse than their parent, {g['rejected_better']} of "
            f"{g['rejected_scored']} gate-failed ones better ({g['rejected_unscored']} rejections not scorable); "
            f"{res['wall_s']:.0f} s wall")
    for sentence, ok in report["checks"].items():
        log(f"[{'x' if ok else ' '}] {sentence}")
    log(f"wrote {args.out}/continual.json, continual.md, continual.png ({report['wall_s']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
