"""One GPU check: the `gpu`-marked tests and the serving and adaptation numbers of a CUDA machine, one report.

    .venv/bin/python bench/gpu.py [-o var/gpu-report.json] [--budget-s 420]  # or: make gpu-check
    .venv/bin/python bench/gpu.py --device cpu --tiny [--no-tests]           # dry run of every part on CPU

1. ``pytest -m gpu`` (every test that needs CUDA; ``--tests`` narrows it).
2. For the demo model (bundled weights, 256x512) and ``deeplabv2-r101`` (random init, 19 classes,
   512x1024), per engine: torch fp32, torch fp16, ONNX Runtime CUDA and TensorRT when the provider
   loads (on CPU: torch fp32 and ONNX Runtime CPU): the network alone at batch 1, and frames/s of
   streaming (``StreamSegmenter.advance``: resize, DIS flow, one network forward, fusion) against naive
   ACCEL (two forwards), the label map excluded (the same CPU work for both; the upload pipeline makes
   it in another thread), with the peak GPU memory of each part.
3. Batching across streams at 1/4/8 concurrent streams, unbatched against ``--max-batch`` (the full
   stream step of ``bench/batching.py``, label map included), on torch fp16 (fp32 on CPU).
4. One STPL adaptation step (the source-free default: batch 4 of 128x256 crops, fp32, as the worker
   trains) for both models: ms per step and peak memory.

Parts run in that order until ``--budget-s`` is spent (the rest is recorded as skipped). Writes one
JSON report and prints a table with the targets of one H100 (``deeplabv2-r101`` streaming >= 60 frames/s
in fp16; the demo model >= 1,000 frames/s batched at 8 streams). Exit status: 2 when CUDA was asked for
and there is none, 1 when a test or a part failed, else 0 (a missed target is reported, not an error).
``--tiny`` shrinks everything (64x128 inputs, a random ``mini-os8`` standing in for ``deeplabv2-r101``, a few frames)
so that the whole script runs in about a minute on a CPU; its numbers only show that every part works.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptation.synth import generate_clip  # noqa: E402
from bench.batching import compare  # noqa: E402
from bench.streaming import demo_engine, random_engine  # noqa: E402
from models.classes import CLASS_SETS  # noqa: E402
from models.flow import DISFlow  # noqa: E402
from service.atomic import write_atomic  # noqa: E402
from service.engine import TorchEngine  # noqa: E402
from service.stream_segmenter import NaiveSegmenter, StreamSegmenter, labels_from_logits  # noqa: E402

TARGETS = {"stream_fps_r101_fp16": 60.0, "batched_fps_demo_8": 1000.0}
TRT_NEEDS_S = 150.0  # budget left for a TensorRT part to start: it builds an engine for the model first
STREAM_COUNTS = [1, 4, 8]


class Plan:
    """Sizes of one run: the full check, or the ``--tiny`` dry run."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.paper = "mini-os8" if tiny else "deeplabv2-r101"  # tiny: random init, 19 classes
        self.sizes = {"demo": (64, 128) if tiny else (256, 512), self.paper: (64, 128) if tiny else (512, 1024)}
        self.frames = 3 if tiny else 40  # timed frames per stream measurement (after 2 warm-up frames)
        self.batch_frames = 2 if tiny else 24  # frames per stream in the batching runs
        self.stpl_warmup, self.stpl_steps = (1, 1) if tiny else (2, 10)
        self.stpl_batch, self.stpl_crop = (2, (32, 64)) if tiny else (4, (128, 256))


def device_used_mib(device: str) -> float | None:
    """GPU memory in use on the device now (every allocator: torch, ONNX Runtime, the CUDA context)."""
    if device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**20, 1)


def measured(device: str, part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; its numbers, its peak GPU memory, or the error that stopped it."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        result = part()
    except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
        return {"error": f"{type(e).__name__}: {e}"}
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None
    return {**result, "peak_gpu_mib": peak}  # torch's allocator; ONNX Runtime parts report device_used_mib


def ping_pong(frames: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` frames going back and forth through a short clip, so neighbours always are neighbours."""
    cycle = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    return [np.ascontiguousarray(frames[cycle[i % len(cycle)]]) for i in range(n)]


def fps(segmenter: StreamSegmenter, frames: list[np.ndarray], warmup: int = 2) -> float:
    """Frames/s of ``advance`` (label maps are not made) over the frames after ``warmup``."""
    for frame in frames[:warmup]:
        segmenter.advance(frame)
    start = time.perf_counter()
    for frame in frames[warmup:]:
        segmenter.advance(frame)
    return (len(frames) - warmup) / (time.perf_counter() - start)


def engine_part(engine: Any, frames: list[np.ndarray], device: str) -> dict[str, Any]:
    """The network alone at batch 1, then streaming and naive frames/s; GPU memory in use at the end."""
    h, w = (int(v) for v in engine.meta["input_size"])
    batch = np.full((1, 3, h, w), 127.0, np.float32)
    times = []
    for i in range(len(frames) + 2):
        start = time.perf_counter()
        engine.frame_logits(batch)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000.0)
    stream = fps(StreamSegmenter(engine, DISFlow()), frames + frames[:2])
    naive = fps(NaiveSegmenter(engine, DISFlow()), frames + frames[:2])
    return {"network_ms": round(statistics.median(times), 3), "stream_fps": round(stream, 2),
            "naive_fps": round(naive, 2), "speedup": round(stream / naive, 3), "device_used_mib":
            device_used_mib(device), "providers": list(engine.providers) if engine.backend == "onnxruntime" else []}


def build_engines(model: torch.nn.Module, meta: dict[str, Any], device: str, tmp: Path,
                  threads: int) -> dict[str, Callable[[], Any]]:
    """Engine builders by variant name, in the order they are measured."""
    from models.onnx_export import export_onnx
    from service.onnx_engine import OnnxEngine

    onnx_dir = tmp / "onnx"

    def onnx(**kwargs: Any) -> Any:
        if not onnx_dir.is_dir():
            export_onnx(model, onnx_dir, tuple(meta["input_size"]), meta.get("sha256"))
        return OnnxEngine(onnx_dir, meta, "onnx", intra_op_threads=threads, **kwargs)

    def tensorrt() -> Any:
        engine = onnx(device="cuda", tensorrt=True, fp16=True, trt_cache=tmp / "trt")
        if engine.providers[0] != "TensorrtExecutionProvider":
            raise RuntimeError(f"the TensorRT provider did not load (serving with {engine.providers})")
        return engine

    if device != "cuda":
        return {"torch-fp32": lambda: TorchEngine(model, meta, "torch-fp32", "cpu"),
                "onnx-cpu": lambda: onnx(device="cpu")}
    import onnxruntime as ort

    builders = {"torch-fp32": lambda: TorchEngine(model, meta, "torch-fp32", "cuda"),
                "torch-fp16": lambda: TorchEngine(copy.deepcopy(model), meta, "torch-fp16", "cuda", half=True),
                "onnx-cuda": lambda: onnx(device="cuda", tensorrt=False)}
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        builders["onnx-tensorrt"] = tensorrt
    return builders


def stpl_step(model: torch.nn.Module, device: str, plan: Plan) -> dict[str, Any]:
    """ms per STPL training step (the trainer the worker runs), timed after a warm-up run."""
    from adaptation.methods import build_method
    from adaptation.trainer import TrainConfig, train

    candidate = copy.deepcopy(model).float().to(device)
    gen = torch.Generator().manual_seed(0)
    h, w = plan.stpl_crop
    cur = torch.rand(plan.stpl_batch, 3, h, w, generator=gen) * 255.0
    batch = {"cur": cur.to(device), "prev": cur.roll(2, dims=-1).to(device),
             "flow": torch.full((plan.stpl_batch, 2, h, w), -2.0).to(device)}
    for steps in (plan.stpl_warmup, plan.stpl_steps):  # a run to warm up kernels and allocator, a timed run
        result = train(candidate, build_method("stpl", seed=0), itertools.repeat(batch),
                       TrainConfig(steps=steps, lr=1e-4))
    if not math.isfinite(result.history[-1]["loss"]):
        raise RuntimeError(f"STPL loss is not finite: {result.history[-1]}")
    return {"ms_per_step": round(1000.0 * result.elapsed_s / result.steps, 2), "steps": result.steps,
            "batch": plan.stpl_batch, "crop": list(plan.stpl_crop), "loss": round(result.history[-1]["loss"], 4)}


def run_tests(paths: list[str], timeout_s: float, device: str) -> dict[str, Any]:
    """``pytest -m gpu`` in a child process; its counts and the summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout_s, 30.0))
    except subprocess.TimeoutExpired:
        return {"ok": False, "returncode": None, "summary": f"timed out after {max(timeout_s, 30.0):.0f} s"}
    return summarize(proc.returncode, proc.stdout, proc.stderr, device)


def summarize(returncode: int, stdout: str, stderr: str, device: str) -> dict[str, Any]:
    """Counts of a ``pytest -q`` run from its last line; ok only if nothing failed and, on CUDA, tests ran."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else stderr.strip()[-300:]
    found = {k.rstrip("s"): int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary)}
    counts = {kind: found.get(kind.rstrip("s"), 0) for kind in ("passed", "failed", "skipped", "errors")}
    ran = counts["passed"] > 0 or device != "cuda"  # on CUDA, a run where everything skipped proves nothing
    ok = returncode == 0 and counts["failed"] == counts["errors"] == 0 and ran
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"ok": ok, "returncode": returncode, "summary": summary, **counts, "failures": failures[:20]}


def load_model(name: str, plan: Plan) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(model, meta with the plan's input size, where the weights come from)."""
    if name == "demo":
        engine, weights = demo_engine()
    else:
        engine, weights = random_engine(name, plan.sizes[name], CLASS_SETS["cityscapes"]), "random init"
    return engine.model, {**engine.meta, "input_size": list(plan.sizes[name])}, weights


def cpu_stages(meta: dict[str, Any], frames: list[np.ndarray]) -> dict[str, Any]:
    """ms of the CPU work around the network at this input size: DIS flow (in every stream step) and the
    label map (upsampling + argmax; in the stream step, in the writer thread for uploads)."""
    h, w = (int(v) for v in meta["input_size"])
    stride = int(meta["architecture"]["output_stride"])
    logits = np.random.default_rng(0).standard_normal((len(meta["classes"]), h // stride, w // stride))
    flow, label_map = DISFlow(), []
    flow_ms = []
    for previous, current in zip(frames[:6], frames[1:7]):
        start = time.perf_counter()
        flow(previous, current)
        flow_ms.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        labels_from_logits(logits.astype(np.float32), (h, w))
        label_map.append((time.perf_counter() - start) * 1000.0)
    return {"flow_ms": round(statistics.median(flow_ms), 2), "label_map_ms": round(statistics.median(label_map), 2)}


def measure(args: argparse.Namespace, plan: Plan, tmp: Path, deadline: float) -> dict[str, Any]:
    """Every model part, in phases (torch engines, batching, STPL, ONNX Runtime), while time is left.

    A part starts only if the budget has ``needs`` seconds left (TensorRT builds its engine first)."""
    device, models, tasks = args.device, {}, []
    for name in ("demo", plan.paper):
        model, meta, weights = load_model(name, plan)
        clip = generate_clip("source", frames=6, size=plan.sizes[name], seed=5).frames
        frames = ping_pong(clip, plan.frames)
        builders = build_engines(model, meta, device, tmp / name, args.threads)
        models[name] = {"weights": weights, "input_size": list(plan.sizes[name]), "engines": {}}
        serving = "torch-fp16" if device == "cuda" else "torch-fp32"
        tasks.append((0, name, ("cpu_stages",), 0.0, lambda meta=meta, frames=frames: cpu_stages(meta, frames)))
        for variant, build in builders.items():
            phase, needs = (0, 0.0) if variant.startswith("torch") else (3, TRT_NEEDS_S if "tensorrt" in variant
                                                                          else 0.0)
            tasks.append((phase, name, ("engines", variant), needs,
                          lambda build=build, frames=frames: engine_part(build(), frames, device)))
        tasks.append((1, name, ("batching",), 0.0, lambda build=builders[serving], frames=frames, variant=serving: {
            "engine": variant, "max_batch": args.max_batch, "wait_ms": args.wait_ms, "frames_per_stream":
            plan.batch_frames, "rows": compare(build(), frames, STREAM_COUNTS, plan.batch_frames, args.max_batch,
                                               args.wait_ms / 1000.0, 1)}))
        tasks.append((2, name, ("stpl",), 0.0, lambda model=model: stpl_step(model, device, plan)))
    for _, name, where, needs, part in sorted(tasks, key=lambda t: t[0]):
        slot = models[name]
        for key in where[:-1]:
            slot = slot[key]
        if deadline - time.monotonic() < needs or time.monotonic() > deadline:
            slot[where[-1]] = {"skipped": f"time budget ({needs:.0f} s needed)" if needs else "time budget spent"}
            continue
        print(f"  {name}: {' '.join(where)} ...", flush=True)
        slot[where[-1]] = measured(device, part)
    return models


def _check(value: float | None, target: float) -> dict[str, Any]:
    """One target: the measured value, the target and whether it is met (None: not measured)."""
    return {"value": value, "target": target, "passed": None if value is None else value >= target}


def checks(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The H100 targets by name; value and passed None where the measurement is missing (skipped, failed,
    or not in this run)."""
    paper = models.get("deeplabv2-r101", {}).get("engines", {})
    fp16 = [paper.get(v, {}).get("stream_fps") for v in ("torch-fp16", "onnx-tensorrt")]
    fp16 = [v for v in fp16 if v is not None]
    rows = models.get("demo", {}).get("batching", {}).get("rows", [])
    batched = [r["batched"]["fps"] for r in rows if r["streams"] == 8]
    return {"deeplabv2-r101 streaming 512x1024 fp16 frames/s": _check(max(fp16) if fp16 else None,
                                                                       TARGETS["stream_fps_r101_fp16"]),
            "demo model batched at 8 streams frames/s": _check(batched[0] if batched else None,
                                                               TARGETS["batched_fps_demo_8"])}


def parts(model: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, result) of every part measured for one model."""
    return [*model["engines"].items(), *((k, model[k]) for k in ("cpu_stages", "batching", "stpl"))]


def _cell(part: dict[str, Any], key: str, fmt: str = "{:.1f}") -> str:
    if "error" in part or "skipped" in part:
        return "error" if "error" in part else "skipped"
    value = part.get(key)
    return "-" if value is None else fmt.format(value)


def table(report: dict[str, Any]) -> str:
    lines = ["| model | part | network ms | stream fps | naive fps | ratio | GPU MiB: torch peak / device used |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for variant, e in m["engines"].items():
            lines.append(f"| {name} | {variant} | {_cell(e, 'network_ms', '{:.2f}')} | {_cell(e, 'stream_fps')} | "
                         f"{_cell(e, 'naive_fps')} | {_cell(e, 'speedup', '{:.2f}')} | {_cell(e, 'peak_gpu_mib')} / "
                         f"{_cell(e, 'device_used_mib')} |")
        stpl, cpu = m["stpl"], m["cpu_stages"]
        lines.append(f"| {name} | STPL step ms | {_cell(stpl, 'ms_per_step')} | | | | {_cell(stpl, 'peak_gpu_mib')} |")
        lines.append(f"| {name} | CPU: DIS flow / label map ms | {_cell(cpu, 'flow_ms')} / "
                     f"{_cell(cpu, 'label_map_ms')} | | | | |")
    lines += ["", "| model | streams | unbatched fps | batched fps | p99 ms unbatched / batched | mean batch |",
              "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        b = m["batching"]
        if "rows" not in b:
            lines.append(f"| {name} | {_cell(b, 'rows')} | | | | |")
        for r in b.get("rows", []):
            u, v = r["unbatched"], r["batched"]
            lines.append(f"| {name} ({b['engine']}) | {r['streams']} | {u['fps']:.1f} | {v['fps']:.1f} | "
                         f"{u['p99_ms']:.1f} / {v['p99_ms']:.1f} | {v['mean_batch']:.2f} |")
    tests = report["tests"]
    lines += ["", f"gpu tests: {tests.get('summary', tests.get('skipped', '-'))}"]
    for name, c in report["checks"].items():
        shown = "-" if c["value"] is None else f"{c['value']:.0f}"
        verdict = "-" if c["passed"] is None else "met" if c["passed"] else "NOT met"
        lines.append(f"check: {name} >= {c['target']:,.0f} ({shown}): {verdict}")
    errors = [f"{n} {k}: {v['error']}" for n, m in report["models"].items() for k, v in parts(m) if "error" in v]
    return "\n".join(lines + [f"error: {e}" for e in errors])


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
                            "threads": args.threads, "python": sys.version.split()[0]}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_mib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # torch fp32 convolutions run in TF32 if so
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", type=Path, default=Path("var/gpu-report.json"),
                   help="the JSON report (default var/gpu-report.json)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that every part works, in ~1 min on CPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this (default 420; the "
                   "parts that run then finish within 8 minutes in all on one H100)")
    p.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    p.add_argument("--tests", nargs="*", default=["tests"], help="paths for pytest -m gpu (default: tests)")
    p.add_argument("--threads", type=int, default=4, help="torch CPU / ONNX Runtime / OpenCV threads (default 4)")
    p.add_argument("--max-batch", type=int, default=8, help="VSS_BATCH_MAX of the batched runs (default 8)")
    p.add_argument("--wait-ms", type=float, default=5.0, help="VSS_BATCH_WAIT_MS of the batched runs (default 5)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none; "
              "run it on a GPU host, or `--device cpu --tiny` for a dry run", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = started + args.budget_s
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    plan = Plan(args.tiny)
    report: dict[str, Any] = {"script": "bench/gpu.py", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "mode": "tiny" if args.tiny else "full", "environment": environment(args),
                              "budget_s": args.budget_s, "targets": TARGETS}
    print(f"bench/gpu.py on {report['environment'].get('gpu', 'cpu')} ({report['mode']} run)", flush=True)
    if args.no_tests:
        report["tests"] = {"ok": True, "skipped": "--no-tests"}
    else:
        print("  pytest -m gpu ...", flush=True)
        report["tests"] = run_tests(args.tests, deadline - time.monotonic(), args.device)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes, as when serving
    with tempfile.TemporaryDirectory(prefix="vss-gpu-check-") as tmp:
        report["models"] = measure(args, plan, Path(tmp), deadline)
    report["checks"] = checks(report["models"])
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output, (json.dumps(report, indent=1, default=float) + "\n").encode())
    print(table(report))
    print(f"report: {args.output} ({report['elapsed_s']} s)")
    failed = not report["tests"]["ok"] or any("error" in v for m in report["models"].values() for _, v in parts(m))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
