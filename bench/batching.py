"""Batching across streams: frames/s and latency of K concurrent streams, batched against unbatched.

    .venv/bin/python bench/batching.py [--streams 1,4,8] [--frames 24] [--max-batch 8] [--wait-ms 5]
                                       [--engine torch|onnx] [--threads 1] [--repeats 2]

Each stream is a thread with its own ``StreamSegmenter`` (DIS flow, fusion, label map at the frame
size) stepping through a generated 256x512 clip, as a websocket session does; the per-frame network
calls go through one ``service.batcher.Batcher`` on the app's FIFO engine lock: ``max_batch=1`` is
the unbatched service, ``--max-batch`` the batched one. Reported per configuration: total frames/s,
median and p99 latency of a frame (one ``step``, waiting for the batch and the lock included), the
mean batch, and the process CPU time per frame (all threads; what batching saves or costs, whatever
the load from other processes). Batched and unbatched runs are interleaved so that load from other processes hits both
alike; torch, ONNX Runtime and OpenCV are pinned to ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptation.synth import generate_clip  # noqa: E402
from bench.streaming import demo_engine  # noqa: E402
from models.flow import DISFlow  # noqa: E402
from service.batcher import Batcher  # noqa: E402
from service.segment_jobs import FairLock, LockedEngine  # noqa: E402
from service.stream_segmenter import StreamSegmenter  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run_streams(engine: Any, clip: list[np.ndarray], streams: int, frames: int, max_batch: int,
                wait_s: float) -> dict[str, float]:
    """``streams`` threads each step ``frames`` frames of ``clip`` (each from its own offset) through one
    batcher; returns frames/s over the whole run, latency percentiles (ms) and the mean batch."""
    batcher = Batcher(max_batch, wait_s, FairLock())
    latencies: list[list[float]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(streams + 1)

    def stream(k: int) -> None:
        try:
            segmenter = StreamSegmenter(LockedEngine(engine, batcher.lock, batcher), DISFlow())
            start_line.wait()
            for i in range(frames):
                frame = clip[(k * 3 + i) % len(clip)]
                start = time.perf_counter()
                segmenter.step(frame)
                latencies[k].append((time.perf_counter() - start) * 1000.0)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(k,), name=f"bench-stream-{k}") for k in range(streams)]
    for t in threads:
        t.start()
    start_line.wait()
    started, cpu_started = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if errors:
        raise errors[0]
    flat = [ms for per in latencies for ms in per]
    return {"fps": len(flat) / seconds, "p50_ms": percentile(flat, 50), "p99_ms": percentile(flat, 99),
            "mean_batch": batcher.stats.mean_batch, "frames": len(flat), "seconds": seconds,
            "cpu_ms_per_frame": 1000.0 * cpu_seconds / len(flat)}


def merge(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of each number over repeated runs."""
    return {k: float(statistics.median(r[k] for r in runs)) for k in runs[0]}


def compare(engine: Any, clip: list[np.ndarray], counts: list[int], frames: int, max_batch: int, wait_s: float,
            repeats: int) -> list[dict[str, Any]]:
    """For each stream count: unbatched and batched runs, interleaved ``repeats`` times."""
    rows = []
    for streams in counts:
        runs: dict[int, list[dict[str, float]]] = {1: [], max_batch: []}
        for _ in range(repeats):
            for mb in runs:
                runs[mb].append(run_streams(engine, clip, streams, frames, mb, wait_s))
        rows.append({"streams": streams, "unbatched": merge(runs[1]), "batched": merge(runs[max_batch])})
    return rows


def table(rows: list[dict[str, Any]], max_batch: int, wait_ms: float) -> str:
    lines = [f"| streams | unbatched fps | batched fps (max {max_batch}, {wait_ms:g} ms) | ratio | "
             "unbatched p50 / p99 ms | batched p50 / p99 ms | mean batch | CPU ms/frame unbatched / batched |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u, b = r["unbatched"], r["batched"]
        lines.append(f"| {r['streams']} | {u['fps']:.1f} | {b['fps']:.1f} | {b['fps'] / u['fps']:.2f} | "
                     f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | "
                     f"{b['mean_batch']:.2f} | {u['cpu_ms_per_frame']:.0f} / {b['cpu_ms_per_frame']:.0f} |")
    return "\n".join(lines)


def onnx_engine(engine: Any, directory: Path, threads: int) -> Any:
    """The same weights as an ONNX Runtime engine (graphs exported into ``directory``)."""
    from models.onnx_export import export_onnx
    from service.onnx_engine import OnnxEngine

    export_onnx(engine.model, directory, tuple(engine.meta["input_size"]), engine.meta.get("sha256"))
    return OnnxEngine(directory, engine.meta, engine.version, device="cpu", intra_op_threads=threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="1,4,8", help="concurrent stream counts (default 1,4,8)")
    p.add_argument("--frames", type=int, default=24, help="frames per stream (default 24)")
    p.add_argument("--max-batch", type=int, default=8, help="VSS_BATCH_MAX of the batched runs (default 8)")
    p.add_argument("--wait-ms", type=float, default=5.0, help="VSS_BATCH_WAIT_MS of the batched runs (default 5)")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime / OpenCV threads (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats, median reported (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    counts = [int(s) for s in args.streams.split(",")]
    engine, source = demo_engine()
    clip = [np.ascontiguousarray(f) for f in generate_clip("fog", frames=12, size=(256, 512), seed=5).frames]
    with tempfile.TemporaryDirectory() as tmp:
        if args.engine == "onnx":
            engine = onnx_engine(engine, Path(tmp), args.threads)
        print(f"demo model ({source}), {args.engine} engine, 256x512, {args.threads} thread(s), "
              f"{args.frames} frames per stream, median of {args.repeats} interleaved runs")
        rows = compare(engine, clip, counts, args.frames, args.max_batch, args.wait_ms / 1000.0, args.repeats)
    print(table(rows, args.max_batch, args.wait_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
