"""Soak: minutes of mixed traffic against one real server on loopback, watching memory and errors.

    .venv/bin/python -m bench.soak [--minutes 10] [--streams 3] [--threads 1] [--json OUT]

``vss`` runs under uvicorn in its own process with its spawned adaptation worker, starting from the
bundled demo model (v0001, plus a copy v0002 to swap to). At the same time:

- ``--streams`` websockets stream 256x512 synthetic frames, one in flight each (one collects clips);
- an uploader posts a 24-frame MP4 to ``/v1/segment`` every few seconds, alternating json / zip / mp4;
- a swapper activates v0002 / v0001 in turn every 30 s;
- a poller reads ``/v1/models``, ``/v1/clips``, ``/v1/adapt``, ``/readyz`` and ``/metrics`` every second;
- one adaptation job (TENT, 60 s budget) starts after a third of the run, on 6 distinct fog clips
  posted to ``/v1/clips`` at the start (the streams loop one clip, which the buffer de-duplicates).

Reports the server's RSS (after a 30 s warm-up, at the end, the peak), the largest RSS increase seen
during any single upload (peak during the request minus RSS when it started; concurrent traffic
counts too, so this over-estimates), p50/p99 frame latency (client round trip), requests and errors
(any 5xx, unexpected status or client exception). Targets: growth <= 100 MB, 0 errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.sync.client import connect

from adaptation.synth import generate_clip
from bench.service import server_process
from service.registry import ModelRegistry
from models.config import DEMO_MODEL_DIR
from service.stream_codec import raw_frame
from service.video_io import VideoWriter

SIZE = (256, 512)
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WARMUP_S = 30.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Monitor:
    """Samples the server's RSS every 50 ms; records errors and per-upload RSS increases."""

    def __init__(self, pid: int) -> None:
        self.pid, self.stop = pid, threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.requests = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), rss_mib(self.pid)))
            self.stop.wait(0.05)

    def peak_between(self, t0: float, t1: float) -> float:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=float("nan"))

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def count(self) -> None:
        with self.lock:
            self.requests += 1


def loop(stop: threading.Event, every_s: float, body: Callable[[int], None], monitor: Monitor, name: str) -> None:
    n = 0
    while not stop.is_set():
        try:
            body(n)
        except Exception as e:  # noqa: BLE001 - every client-side failure is an error of the soak
            monitor.error(f"{name}: {type(e).__name__}: {e}")
        n += 1
        stop.wait(every_s)


def streamer(url: str, frames: list[bytes], collect: bool, stop: threading.Event, monitor: Monitor,
             latencies: list[float]) -> None:
    try:
        with connect(f"{url.replace('http', 'ws')}/v1/stream", max_size=None, compression=None,
                     additional_headers=AUTH) as ws:
            ws.send(json.dumps({"format": "rle", "collect": collect}))
            if json.loads(ws.recv(timeout=120)).get("type") != "ready":
                raise RuntimeError("no ready message")
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                ws.send(frames[i % len(frames)])
                meta = json.loads(ws.recv(timeout=120))
                ws.recv(timeout=120)
                if meta.get("type") != "frame":
                    raise RuntimeError(f"unexpected reply {meta}")
                latencies.append((time.perf_counter() - t0) * 1000)
                monitor.count()
                i += 1
    except Exception as e:  # noqa: BLE001
        monitor.error(f"stream: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of its worker")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    registry = ModelRegistry(tmp / "models")
    registry.import_dir(DEMO_MODEL_DIR, activate=True)
    shutil.copytree(registry.path("v0001"), registry.root / "v0002")
    clip = generate_clip("fog", 24, SIZE, seed=7)
    frames = [raw_frame(f) for f in clip.frames]
    video = tmp / "upload.mp4"
    with VideoWriter(video, 10.0, SIZE[1], SIZE[0]) as writer:
        for frame in clip.frames:
            writer.write(frame)
    extra = []
    for seed in range(100, 106):
        path = tmp / f"extra-{seed}.mp4"
        with VideoWriter(path, 10.0, SIZE[1], SIZE[0]) as writer:
            for frame in generate_clip("fog", 8, SIZE, seed=seed).frames:
                writer.write(frame)
        extra.append(path)
    env = {"VSS_MODEL_DIR": str(tmp / "models"), "VSS_BUFFER_DIR": str(tmp / "buffer"),
           "VSS_JOB_DIR": str(tmp / "jobs"), "VSS_CACHE_DIR": str(tmp / "cache"), "VSS_API_KEY": KEY,
           "VSS_DEVICE": "cpu", "VSS_FLOW": "dis-ultrafast", "VSS_REGISTRY_POLL_MS": "200",
           "VSS_BUFFER_CLIP_FRAMES": "8", "VSS_BUFFER_CLIP_EVERY": "48", "VSS_ADAPT_MIN_CLIPS": "2",
           "VSS_COLLECT": "all", "VSS_ADAPT_THREADS": str(args.threads), "VSS_WORKER": "spawn",
           "VSS_LOG_LEVEL": "warning"}
    duration = args.minutes * 60
    report: dict[str, Any] = {"minutes": args.minutes, "streams": args.streams, "threads": args.threads}
    latencies: list[float] = []
    upload_growth: list[float] = []
    job: dict[str, Any] = {}
    with server_process(env, args.threads) as (port, pid), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300, headers=AUTH) as http:
        url = f"http://127.0.0.1:{port}"
        monitor = Monitor(pid)
        monitor.thread.start()
        for path in extra:
            with path.open("rb") as f:
                r = http.post("/v1/clips", files={"video": (path.name, f, "video/mp4")})
            if r.status_code != 201:
                monitor.error(f"POST /v1/clips: {r.status_code} {r.text[:200]}")
        stop = threading.Event()

        def expect(response: httpx.Response, *ok: int) -> None:
            monitor.count()
            if response.status_code not in ok:
                monitor.error(f"{response.request.method} {response.request.url.path}: "
                              f"{response.status_code} {response.text[:200]}")

        def upload(n: int) -> None:
            fmt = ("json", "zip", "mp4")[n % 3]
            t0, before = time.monotonic(), rss_mib(pid)
            with video.open("rb") as f:
                r = http.post("/v1/segment", files={"video": ("clip.mp4", f, "video/mp4")},
                              data={"format": fmt, "collect": "false"})
            upload_growth.append(monitor.peak_between(t0, time.monotonic()) - before)
            expect(r, 200)

        def swap(n: int) -> None:
            if n:
                expect(http.post(f"/v1/models/{'v0002' if n % 2 else 'v0001'}/activate"), 200)

        def poll(n: int) -> None:
            for path in ("/v1/models", "/v1/clips", "/v1/adapt", "/readyz", "/metrics"):
                expect(http.get(path), 200)

        def adapt(n: int) -> None:
            if n == 1 and not job:
                r = http.post("/v1/adapt", json={"method": "tent", "steps": 5000, "time_budget_s": 60})
                expect(r, 202)
                job.update(r.json() if r.status_code == 202 else {"state": f"refused {r.status_code}"})
            elif job.get("id"):
                job.update(http.get(f"/v1/adapt/{job['id']}").json())

        workers = [threading.Thread(target=streamer, args=(url, frames, k == 0, stop, monitor, latencies))
                   for k in range(args.streams)]
        workers += [threading.Thread(target=loop, args=(stop, every, body, monitor, name)) for name, every, body in
                    (("upload", 5.0, upload), ("swap", 30.0, swap), ("poll", 1.0, poll),
                     ("adapt", duration / 3, adapt))]
        t_start = time.monotonic()
        for w in workers:
            w.start()
        stop.wait(min(WARMUP_S, duration / 4))
        report["rss_after_warmup_mib"] = rss_mib(pid)
        stop.wait(max(0.0, duration - (time.monotonic() - t_start)))
        stop.set()
        for w in workers:
            w.join(300)
        if job.get("id"):
            job.update(http.get(f"/v1/adapt/{job['id']}").json())
        report["rss_end_mib"] = rss_mib(pid)
        monitor.stop.set()
        monitor.thread.join()
        report["rss_first_mib"] = monitor.samples[0][1]
        report["rss_peak_mib"] = max(r for _, r in monitor.samples)
    report["growth_mib"] = report["rss_end_mib"] - report["rss_after_warmup_mib"]
    report["largest_upload_rss_increase_mib"] = max(upload_growth, default=float("nan"))
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    report.update(frames=len(latencies), uploads=len(upload_growth), requests=monitor.requests,
                  latency_p50_ms=float(np.percentile(lat, 50)), latency_p99_ms=float(np.percentile(lat, 99)),
                  errors=monitor.errors, adapt_job={k: job.get(k) for k in ("state", "version", "error")})
    report["checks"] = {"growth <= 100 MB": report["growth_mib"] * 1.048576 <= 100, "0 errors": not monitor.errors}
    print(f"soak: {args.minutes:g} min, {args.streams} streams, {args.threads} thread(s)")
    for key in ("rss_first_mib", "rss_after_warmup_mib", "rss_end_mib", "rss_peak_mib", "growth_mib",
                "largest_upload_rss_increase_mib", "latency_p50_ms", "latency_p99_ms"):
        print(f"  {key:34s} {report[key]:10.1f}")
    print(f"  frames {report['frames']}, uploads {report['uploads']}, requests {report['requests']}, "
          f"adapt job {report['adapt_job']}")
    print(f"  errors ({len(monitor.errors)}): " + "; ".join(monitor.errors[:10]))
    for name, ok in report["checks"].items():
        print(f"  [{'x' if ok else ' '}] {name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
