"""Service benchmark: what the HTTP/websocket data plane costs over calling the model directly.

    .venv/bin/python bench/service.py [--frames 48] [--threads 1] [--swaps 20] [--streams 4] [--skip-onnx]

Runs ``vss`` under a real uvicorn on 127.0.0.1, in its own process (so the benchmark's clients do not
share its GIL), with the bundled demo model (random init of the same config if it is missing), and
prints, all measured in one run on the same clip (the synthetic generator's ``source`` style at the
model's 256x512 input size; the direct baselines use the same weights in this process):

1. ``WS /v1/stream`` frames/s against ``StreamSegmenter.step`` called directly on the same frames
   (engine + pipeline: flow, network, fusion, labels); raw RGB frames, RLE replies, 2 frames in flight.
   Target >= 0.9.
2. ``POST /v1/segment`` frames/s (wall time of the whole request: upload, isolated probe and decode,
   flow, network, overlay, encode) against model-only frames/s (``frame_logits`` + ``fuse``). Target >= 0.85.
3. ONNX Runtime against eager torch, ms per frame of the per-frame network. Target >= 1.5x.
4. ``--swaps`` hot swaps (``POST /v1/models/{v}/activate``, alternating versions) under ``--streams``
   concurrent websocket streams: failed requests (target 0) and the longest stall of any stream in
   frames (the longest gap between two replies, in median gaps, minus one; target <= 1).

Torch and OpenCV are pinned to ``--threads`` threads (1 by default: the other core is left to the
decoder process and the encoder thread, as on a shared 2-core machine). Prints ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import torch
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptation.synth import generate_clip  # noqa: E402
from models.accel import build_model  # noqa: E402
from models.checkpoint import load_checkpoint, make_meta, save_checkpoint  # noqa: E402
from models.classes import CLASS_SETS, palette_for  # noqa: E402
from models.config import get_config  # noqa: E402
from models.flow import build_flow  # noqa: E402
from models.stream import stream_step  # noqa: E402
from service.engine import TorchEngine  # noqa: E402
from service.stream_segmenter import StreamSegmenter  # noqa: E402
from service.registry import ModelRegistry  # noqa: E402
from models.config import DEMO_MODEL_DIR  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.stream_codec import raw_frame  # noqa: E402
from service.video_io import VideoWriter  # noqa: E402

INPUT_SIZE = (256, 512)
ROOT = Path(__file__).resolve().parent.parent


SERVER = """
import sys, cv2, torch, uvicorn
threads, port = int(sys.argv[1]), int(sys.argv[2])
cv2.setNumThreads(threads)
torch.set_num_threads(threads)
uvicorn.run("service.app:create_app", factory=True, host="127.0.0.1", port=port, log_level="warning",
            ws_max_size=64 * 2**20)
"""


@contextmanager
def server_process(env: dict[str, str], threads: int) -> Iterator[tuple[int, int]]:
    """``vss`` under uvicorn in its own process on a free loopback port (client and server do not share
    a GIL); yields (port, pid) once a model serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(threads), str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def checkpoint(tmp: Path) -> tuple[Path, str]:
    if (DEMO_MODEL_DIR / "meta.json").is_file():
        return DEMO_MODEL_DIR, "bundled demo model"
    cfg = get_config("mini-os8")
    names = list(CLASS_SETS["synthetic"])
    torch.manual_seed(0)
    meta = make_meta(cfg, names, palette_for(names), INPUT_SIZE, source="bench-random-init")
    return save_checkpoint(tmp / "random", build_model(cfg).eval(), meta), "random init (demo model missing)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ws_chunk(ws: Any, messages: list[bytes], in_flight: int = 2) -> None:
    """Send frames with ``in_flight`` outstanding and wait for every reply (no drops)."""
    sent = received = 0
    while received < len(messages):
        while sent < len(messages) and sent - received < in_flight:
            ws.send(messages[sent])
            sent += 1
        meta = json.loads(ws.recv())
        ws.recv()
        if meta.get("type") != "frame" or meta["dropped"]:
            raise RuntimeError(f"unexpected reply {meta}")
        received += 1


def ws_vs_direct(port: int, pid: int, engine: Any, flow: str, frames: list[np.ndarray], rounds: int,
                 chunk: int = 8) -> dict[str, list[float]]:
    """Frames/s and CPU ms/frame of ``WS /v1/stream`` and of ``StreamSegmenter.step`` on the same frames,
    alternating every ``chunk`` frames so that both see the same machine load."""
    messages = [raw_frame(f) for f in frames]
    segmenter = StreamSegmenter(engine, build_flow(flow))
    seconds = {"direct": 0.0, "ws": 0.0}
    cpu = {"direct": 0.0, "ws": 0.0}
    with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None) as ws:
        ws.send(json.dumps({"format": "rle", "collect": False}))
        json.loads(ws.recv())
        ws_chunk(ws, messages[:2])
        segmenter.step(frames[0])
        for _ in range(rounds):
            for i in range(0, len(frames), chunk):
                t, c = time.perf_counter(), time.process_time()
                for frame in frames[i:i + chunk]:
                    segmenter.step(frame)
                seconds["direct"] += time.perf_counter() - t
                cpu["direct"] += time.process_time() - c
                t, c = time.perf_counter(), cpu_seconds(pid)
                ws_chunk(ws, messages[i:i + chunk])
                seconds["ws"] += time.perf_counter() - t
                cpu["ws"] += cpu_seconds(pid) - c
    n = rounds * len(frames)
    return {k: [n / seconds[k], 1000 * cpu[k] / n] for k in seconds}


def direct_fps(engine: Any, flow_name: str, frames: list[np.ndarray]) -> float:
    segmenter = StreamSegmenter(engine, build_flow(flow_name))
    start = time.perf_counter()
    for frame in frames:
        segmenter.step(frame)
    return len(frames) / (time.perf_counter() - start)


def model_only_fps(engine: Any, frames: list[np.ndarray]) -> float:
    batches = [f.transpose(2, 0, 1)[None].astype(np.float32) for f in frames]
    zero = np.zeros((1, 2, *frames[0].shape[:2]), np.float32)
    previous = None
    start = time.perf_counter()
    for batch in batches:
        _, previous = stream_step(engine, batch, previous, zero)
    return len(batches) / (time.perf_counter() - start)


def segment_fps(port: int, video: Path, frames: int, fmt: str) -> float:
    data = video.read_bytes()
    start = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/segment?format={fmt}&collect=false",
                   files={"video": ("clip.mp4", data, "video/mp4")}, timeout=600)
    seconds = time.perf_counter() - start
    if r.status_code != 200 or r.headers["x-frames"] != str(frames):
        raise RuntimeError(f"/v1/segment answered {r.status_code}: {r.text[:200]}")
    return frames / seconds


def onnx_vs_torch(ckpt: Path, tmp: Path, engine: Any, frames: list[np.ndarray], threads: int) -> tuple[float, float]:
    from service.onnx_engine import OnnxEngine

    copy = tmp / "onnx-ckpt"
    shutil.copytree(ckpt, copy)  # the export writes graphs beside the weights: never into the repository
    meta = json.loads((copy / "meta.json").read_text())
    onnx = OnnxEngine.from_checkpoint(copy, meta, "onnx", cache_dir=tmp / "cache", device="cpu",
                                      intra_op_threads=threads, tensorrt=False)
    batches = [f.transpose(2, 0, 1)[None].astype(np.float32) for f in frames]
    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    for e in (engine, onnx):
        e.frame_logits(batches[0])
    for batch in batches:  # interleaved, so both see the same machine load
        for name, e in (("torch", engine), ("onnx", onnx)):
            t = time.perf_counter()
            e.frame_logits(batch)
            times[name].append(1000 * (time.perf_counter() - t))
    return statistics.median(times["torch"]), statistics.median(times["onnx"])


def swap_under_streams(port: int, frames: list[np.ndarray], swaps: int, streams: int) -> dict[str, Any]:
    """Activate alternating versions while ``streams`` clients stream; count failures and stalls."""
    stop = threading.Event()
    failures: list[str] = []
    replies: list[list[tuple[float, str, bool]]] = [[] for _ in range(streams)]
    messages = [raw_frame(f) for f in frames]

    def client(k: int) -> None:
        try:
            with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None) as ws:
                ws.send(json.dumps({"format": "rle", "collect": False}))
                json.loads(ws.recv())
                i = 0
                while not stop.is_set():
                    ws.send(messages[i % len(messages)])
                    meta = json.loads(ws.recv(timeout=60))
                    ws.recv(timeout=60)
                    if meta.get("type") != "frame":
                        failures.append(f"stream {k}: {meta}")
                        return
                    replies[k].append((time.perf_counter(), meta["model_version"], meta["keyframe"]))
                    i += 1
        except Exception as e:  # noqa: BLE001 - any client error counts as a failed request
            failures.append(f"stream {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    swap_times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        for n in range(swaps):
            version = "v0002" if n % 2 == 0 else "v0001"
            swap_times.append(time.perf_counter())
            r = http.post(f"/v1/models/{version}/activate")
            if r.status_code != 200:
                failures.append(f"activate {version}: {r.status_code} {r.text[:100]}")
            time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(60)
    stalls, missing_keyframes, changes = [], 0, 0
    for log in replies:
        gaps = np.diff([t for t, _, _ in log])
        if len(gaps) > 2:
            stalls.append(float(gaps.max() / np.median(gaps)) - 1.0)
        for (_, v0, _), (_, v1, key) in zip(log, log[1:], strict=False):
            if v1 != v0:
                changes += 1
                missing_keyframes += not key
    return {"failures": failures, "stall_frames": max(stalls, default=float("nan")), "version_changes": changes,
            "changes_without_keyframe": missing_keyframes, "frames": sum(map(len, replies))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=48, help="frames of the benchmark clip")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenCV / ONNX Runtime threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each throughput measurement")
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--skip-onnx", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vss-bench-"))
    try:
        ckpt, what = checkpoint(tmp)
        registry = ModelRegistry(tmp / "models")
        registry.import_dir(ckpt, activate=True)
        shutil.copytree(registry.path("v0001"), registry.root / "v0002")
        clip = generate_clip("source", frames=args.frames, size=INPUT_SIZE, seed=1)
        frames = [np.ascontiguousarray(f) for f in clip.frames]
        video = tmp / "clip.mp4"
        with VideoWriter(video, 15.0, INPUT_SIZE[1], INPUT_SIZE[0], crf=18) as writer:
            for f in frames:
                writer.write(f)
        flow = str(Settings.model_fields["flow"].default)
        env = {f"VSS_{k}": str(v) for k, v in {
            "MODEL_DIR": tmp / "models", "JOB_DIR": tmp / "jobs", "CACHE_DIR": tmp / "cache",
            "BUFFER_DIR": tmp / "buffer", "DEMO_MODEL": "none", "DEVICE": "cpu", "ENGINE": "torch", "FLOW": flow,
            "INTRA_OP_THREADS": args.threads, "JOB_FRAME_THRESHOLD": 10**6, "BUFFER_ENABLED": "false",
            "REGISTRY_POLL_MS": 200, "LOG_LEVEL": "warning", "LOG_JSON": "false"}.items()}
        model, meta = load_checkpoint(registry.path("v0001"))
        engine = TorchEngine(model, meta, "v0001", "cpu")
        print(f"model: {what}; clip: {args.frames} frames at {INPUT_SIZE[0]}x{INPUT_SIZE[1]}; flow {flow}; "
              f"{args.threads} thread(s) per process; torch {torch.__version__}")
        with server_process(env, args.threads) as (port, pid):
            direct_fps(engine, flow, frames[:4])  # warm-up
            segment_fps(port, video, args.frames, "json")
            streams = ws_vs_direct(port, pid, engine, flow, frames, args.rounds)
            rows: dict[str, list[float]] = {k: [] for k in ("model", "mp4", "json")}
            cpu: dict[str, list[float]] = {k: [] for k in rows}  # CPU ms per frame
            runs = {"model": lambda: model_only_fps(engine, frames),
                    "mp4": lambda: segment_fps(port, video, args.frames, "mp4"),
                    "json": lambda: segment_fps(port, video, args.frames, "json")}

            def measure(key: str) -> None:
                clock = time.process_time if key == "model" else (lambda: cpu_seconds(pid))
                before = clock()
                rows[key].append(runs[key]())
                cpu[key].append(1000 * (clock() - before) / len(frames))

            for _ in range(args.rounds):  # interleaved, so every path sees the same machine load
                for key in ("model", "mp4", "model", "json"):
                    measure(key)
            print("\n== throughput (frames/s) and CPU per frame (ms) ==")
            print(f"{'StreamSegmenter.step, direct':36s} {streams['direct'][0]:7.2f}   cpu {streams['direct'][1]:6.1f}")
            print(f"{'WS /v1/stream (server process)':36s} {streams['ws'][0]:7.2f}   cpu {streams['ws'][1]:6.1f}   "
                  f"(alternating with the line above every 8 frames)")
            for k, label in (("model", "model only (frame_logits + fuse)"), ("mp4", "POST /v1/segment (mp4)"),
                             ("json", "POST /v1/segment (json)")):
                print(f"{label:36s} {statistics.median(rows[k]):7.2f}   cpu {statistics.median(cpu[k]):6.1f}   "
                      f"(rounds: {', '.join(f'{v:.2f}' for v in rows[k])})")

            def paired(a: str, offset: int) -> float:
                """Median over rounds of a / model-only, each with the model measured right before it."""
                return statistics.median(x / y for x, y in zip(rows[a], rows["model"][offset::2], strict=True))

            ratios = {"ws_vs_direct": streams["ws"][0] / streams["direct"][0],
                      "segment_mp4_vs_model": paired("mp4", 0), "segment_json_vs_model": paired("json", 1),
                      "ws_cpu": streams["direct"][1] / streams["ws"][1],
                      "mp4_cpu": statistics.median(cpu["model"]) / statistics.median(cpu["mp4"])}
            onnx = None
            if not args.skip_onnx:
                onnx = onnx_vs_torch(ckpt, tmp, engine, frames, args.threads)
                ratios["onnx_speedup"] = onnx[0] / onnx[1]
            swap = swap_under_streams(port, frames, args.swaps, args.streams)
        print("\n== ratios ==")
        print(f"websocket / direct engine+pipeline      {ratios['ws_vs_direct']:6.3f}   (target >= 0.9)")
        print(f"/v1/segment mp4 / model only            {ratios['segment_mp4_vs_model']:6.3f}   (target >= 0.85)")
        print(f"/v1/segment json / model only           {ratios['segment_json_vs_model']:6.3f}")
        print(f"CPU per frame, direct / websocket server {ratios['ws_cpu']:6.3f}   (a load-independent view)")
        print(f"CPU per frame, model / /v1/segment mp4   {ratios['mp4_cpu']:6.3f}   (server process; the decoder "
              f"processes and the machine's free core not counted)")
        if onnx is not None:
            print(f"ONNX Runtime vs torch eager             {ratios['onnx_speedup']:6.2f}x  "
                  f"({onnx[1]:.1f} vs {onnx[0]:.1f} ms/frame; target >= 1.5x)")
        print(f"hot swaps: {args.swaps} under {args.streams} streams, {swap['frames']} frames answered")
        print(f"  failed requests                       {len(swap['failures']):6d}   (target 0)")
        print(f"  longest stall (frames)                {swap['stall_frames']:6.2f}   (target <= 1)")
        print(f"  version changes seen by streams       {swap['version_changes']:6d}   "
              f"({swap['changes_without_keyframe']} without a keyframe)")
        for failure in swap["failures"][:5]:
            print(f"  ! {failure}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
