"""Streaming benchmark: ms/frame of naive ACCEL vs streaming reuse, where the time goes, DIS presets.

    .venv/bin/python bench/streaming.py [--frames 12] [--paper-frames 3] [--skip-paper]

1. For the demo model config (``mini-os8`` at 256x512; the bundled weights if present, else random
   init) and the paper config (``deeplabv2-r101`` at 512x1024, random init): ms per frame of
   ``NaiveSegmenter`` (t and t-1 through the network every frame, as the research code does) against
   ``StreamSegmenter`` (t-1 logits cached), and the share of a streaming frame spent in decode, resize,
   flow, network, fusion, upsample + argmax, palette and encode.
2. Post-processing variants against the reference (torch bilinear upsample + argmax).
3. DIS presets against the synthetic generator's exact flow: EPE, label-warp accuracy and time.

Torch and OpenCV are pinned to 2 threads (``--threads``). Prints tables and ratios (median and min over
interleaved repeats: on a shared machine the min is the better estimate of the unloaded cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptation.metrics import warp_labels_np  # noqa: E402
from adaptation.synth import generate_clip  # noqa: E402
from models.accel import build_model  # noqa: E402
from models.checkpoint import load_checkpoint, make_meta  # noqa: E402
from models.classes import CLASS_SETS, label_png, palette_for  # noqa: E402
from models.config import DEMO_MODEL_DIR, get_config  # noqa: E402
from models.flow import DISFlow  # noqa: E402
from service.engine import TorchEngine  # noqa: E402
from service.stream_segmenter import (  # noqa: E402
    NaiveSegmenter,
    StreamSegmenter,
    class_fractions,
    labels_from_logits,
    overlay,
    resize_rgb,
)
from service.video_io import VideoWriter, read_frames  # noqa: E402

THREADS = 2


class Timed:
    """Wraps a callable and accumulates its wall time under ``name`` in ``sink``."""

    def __init__(self, fn: Callable[..., Any], name: str, sink: dict[str, list[float]]) -> None:
        self.fn, self.name, self.sink = fn, name, sink

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        out = self.fn(*args)
        self.sink[self.name].append((time.perf_counter() - start) * 1000)
        return out


class TimedEngine:
    """Engine wrapper recording network and fusion time separately (and keeping the last fused logits)."""

    def __init__(self, engine: TorchEngine, sink: dict[str, list[float]]) -> None:
        self.version, self.meta, self.backend = engine.version, engine.meta, engine.backend
        self.frame_logits = Timed(engine.frame_logits, "network", sink)
        self._fuse = Timed(engine.fuse, "fuse", sink)
        self.last_fused: np.ndarray | None = None

    def fuse(self, *args: Any) -> np.ndarray:
        self.last_fused = self._fuse(*args)
        return self.last_fused


def demo_engine() -> tuple[TorchEngine, str]:
    if (DEMO_MODEL_DIR / "meta.json").is_file():
        model, meta = load_checkpoint(DEMO_MODEL_DIR)
        return TorchEngine(model, meta, "demo"), "bundled demo weights"
    return random_engine("mini-os8", (256, 512), CLASS_SETS["synthetic"]), "random init (no demo model yet)"


def random_engine(config: str, size: tuple[int, int], classes: tuple[str, ...]) -> TorchEngine:
    torch.manual_seed(0)
    cfg = get_config(config, num_classes=len(classes))
    meta = make_meta(cfg, list(classes), palette_for(classes), size)
    return TorchEngine(build_model(cfg), meta, config)


def run_stream(segmenter: StreamSegmenter, frames: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """(wall ms, process CPU ms) per step over the non-key frames."""
    wall, cpu = [], []
    for i, frame in enumerate(frames):
        start, start_cpu = time.perf_counter(), time.process_time()
        segmenter.step(frame)
        if i > 0:
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - start_cpu) * 1000)
    return wall, cpu


def stage_breakdown(engine: TorchEngine, video: Path, n: int) -> dict[str, list[float]]:
    """ms per streaming frame for each stage (keyframe excluded), decode and output encoding included.

    ``step`` is the whole ``StreamSegmenter.step``; network, fuse and flow are timed inside it; resize,
    upsample + argmax and class fractions are re-run alone on the same data to time them.
    """
    sink: dict[str, list[float]] = defaultdict(list)
    timed = TimedEngine(engine, sink)
    seg = StreamSegmenter(timed, Timed(DISFlow(), "flow", sink))
    palette = np.asarray(engine.meta["palette"], np.uint8)
    frames_iter = iter(read_frames(video, max_frames=n))

    def clock(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        sink[name].append((time.perf_counter() - start) * 1000)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        writer = None
        while (frame := clock("decode", next, frames_iter, None)) is not None:
            start_cpu = time.process_time()
            result = clock("step", seg.step, frame)
            sink["step cpu"].append((time.process_time() - start_cpu) * 1000)
            clock("resize", resize_rgb, frame, tuple(engine.meta["input_size"]))
            assert timed.last_fused is not None
            labels = clock("upsample+argmax", labels_from_logits, timed.last_fused[0], frame.shape[:2])
            clock("class fractions", class_fractions, labels, list(engine.meta["classes"]))
            blended = clock("palette (overlay)", overlay, frame, result.labels, palette)
            clock("encode PNG", label_png, result.labels, palette)
            if writer is None:
                writer = VideoWriter(Path(tmp) / "o.mp4", 10, frame.shape[1], frame.shape[0])
            clock("encode MP4", writer.write, blended)
        sink["decode"].pop()  # the final next() that found no frame
        if writer is not None:
            writer.close()
    return {k: v[1:] if len(v) > 1 else v for k, v in sink.items()}  # drop the keyframe / warm-up


def model_section(title: str, engine: TorchEngine, clip_frames: np.ndarray, n: int, repeats: int) -> None:
    print(f"\n== {title} ==")
    frames = [np.ascontiguousarray(f) for f in clip_frames[:n]]
    stages: dict[str, list[float]] = defaultdict(list)
    naive: list[float] = []
    cpu: dict[str, list[float]] = {"naive": [], "stream": []}
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        with VideoWriter(video, 10, frames[0].shape[1], frames[0].shape[0], crf=18) as writer:
            for f in frames:
                writer.write(f)
        for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
            wall, cpu_ms = run_stream(NaiveSegmenter(engine, DISFlow()), frames)
            naive += wall
            cpu["naive"] += cpu_ms
            for k, v in stage_breakdown(engine, video, n).items():
                stages[k] += v
    stream, cpu["stream"] = stages["step"], stages["step cpu"]
    med, low = statistics.median, min
    print(f"{'ms/frame (non-key frames)':32s} {'median':>9s} {'min':>9s} {'CPU med':>9s} {'CPU min':>9s}")
    for name, w, c in (("naive ACCEL (2 forwards/frame)", naive, cpu["naive"]),
                       ("streaming reuse (1 forward)", stream, cpu["stream"])):
        print(f"{name:32s} {med(w):9.1f} {low(w):9.1f} {med(c):9.1f} {low(c):9.1f}")
    ratios = [med(naive) / med(stream), low(naive) / low(stream), med(cpu["naive"]) / med(cpu["stream"]),
              low(cpu["naive"]) / low(cpu["stream"])]
    print(f"{'speed-up naive/streaming':32s} " + " ".join(f"{r:8.2f}x" for r in ratios) + "   (target >= 1.8x)")
    order = ["decode", "resize", "flow", "network", "fuse", "upsample+argmax", "class fractions",
             "palette (overlay)", "encode PNG", "encode MP4"]
    per = {k: med(stages[k]) for k in order}
    total = sum(per.values())
    print(f"{'stage (streaming frame)':24s} {'median ms':>9s} {'share':>7s} {'min ms':>8s}")
    for k in order:
        print(f"{k:24s} {per[k]:9.2f} {100 * per[k] / total:6.1f}% {low(stages[k]):8.2f}")
    print(f"{'sum':24s} {total:9.2f}")


def postprocess_section() -> None:
    print("\n== post-processing: stride-8 logits (7 classes) -> labels ==")
    rng = np.random.default_rng(0)
    logits = cv2.GaussianBlur(rng.standard_normal((32, 64, 7)).astype(np.float32), (0, 0), 2).transpose(2, 0, 1)
    logits = np.ascontiguousarray(logits * 10)
    t = torch.from_numpy(logits)[None]

    def reference(size: tuple[int, int]) -> np.ndarray:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=True)[0].argmax(0).numpy()

    def mid_nearest(size: tuple[int, int]) -> np.ndarray:
        small = labels_from_logits(logits, (256, 512))
        return cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def low_nearest(size: tuple[int, int]) -> np.ndarray:
        return cv2.resize(logits.argmax(0).astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    variants = {"torch upsample + argmax (reference)": reference,
                "cv2 plane upsample + running max (used)": lambda s: labels_from_logits(logits, s),
                "argmax at 256x512 + nearest": mid_nearest, "argmax at logits + nearest": low_nearest}
    for size in [(256, 512), (720, 1280)]:
        ref = reference(size)
        for name, fn in variants.items():
            times = []
            for _ in range(6):
                start = time.perf_counter()
                out = fn(size)
                times.append((time.perf_counter() - start) * 1000)
            print(f"{size[0]}x{size[1]:<5d} {name:42s} {statistics.median(times[1:]):7.2f} ms "
                  f"(min {min(times[1:]):6.2f})   differs on {100 * (out != ref).mean():6.3f}%")


def _warp_acc(prev: np.ndarray, cur: np.ndarray, flow: np.ndarray) -> float:
    warped, valid = warp_labels_np(prev, flow)
    return float((warped == cur)[valid].mean())


def dis_section(size: tuple[int, int], frames: int) -> None:
    """EPE against the exact flow, and how well each flow carries labels from t-1 to t, at full and at
    logit (1/8) resolution, where the pipeline uses it."""
    styles = ("source", "fog", "night", "noise-blur", "recolor")
    print(f"\n== DIS presets vs the generator's exact flow ({size[0]}x{size[1]}, {frames} frames x "
          f"{len(styles)} styles) ==")
    clips = [generate_clip(style, frames=frames, size=size, seed=11) for style in styles]
    pairs = [(c, t) for c in clips for t in range(1, frames)]
    print(f"{'preset':10s} {'EPE px':>7s} {'<1px %':>7s} {'warp acc %':>11s} {'EPE@1/8':>8s} {'acc@1/8 %':>10s} "
          f"{'ms med':>7s} {'ms min':>7s}")
    rows = {"(exact)": [lambda c, t: c.flow[t]], "(no flow)": [lambda c, t: np.zeros_like(c.flow[t])]}
    for preset in ("ultrafast", "fast", "medium"):
        dis, ms, est = DISFlow(preset), [], {}
        for c, t in pairs:
            start = time.perf_counter()
            est[(id(c), t)] = dis(c.frames[t - 1], c.frames[t])
            ms.append((time.perf_counter() - start) * 1000)
        rows[preset] = [lambda c, t, est=est: est[(id(c), t)], ms]
    for name in ("ultrafast", "fast", "medium", "(exact)", "(no flow)"):
        get = rows[name][0]
        err = [np.linalg.norm(get(c, t) - c.flow[t], axis=-1) for c, t in pairs]
        # logit grid: pixel (i, j) is frame pixel (8i, 8j), so vectors shrink by 8
        err8 = [np.linalg.norm(get(c, t)[::8, ::8] - c.flow[t][::8, ::8], axis=-1) / 8 for c, t in pairs]
        acc = [_warp_acc(c.labels[t - 1], c.labels[t], get(c, t)) for c, t in pairs]
        acc8 = [_warp_acc(c.labels[t - 1][::8, ::8], c.labels[t][::8, ::8], get(c, t)[::8, ::8] / 8)
                for c, t in pairs]
        times = rows[name][1] if len(rows[name]) > 1 else None
        timing = f"{statistics.median(times):7.2f} {min(times):7.2f}" if times else ""
        epe, inliers = np.mean([e.mean() for e in err]), 100 * np.mean([(e < 1).mean() for e in err])
        print(f"{name:10s} {epe:7.3f} {inliers:7.1f} {100 * np.mean(acc):11.2f} "
              f"{np.mean([e.mean() for e in err8]):8.3f} {100 * np.mean(acc8):10.2f} {timing}")
    print(f"default preset in models/flow.py: DISFlow() -> {DISFlow().name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=12, help="frames for the demo config (default 12)")
    p.add_argument("--paper-frames", type=int, default=3, help="frames for the r101 config (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats for the demo config (default 3)")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch/OpenCV threads (default {THREADS})")
    p.add_argument("--skip-paper", action="store_true", help="skip the slow deeplabv2-r101 512x1024 part")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; OpenCV {cv2.__version__}, {args.threads} threads")
    engine, source = demo_engine()
    clip = generate_clip("fog", frames=args.frames, size=(256, 512), seed=5)
    model_section(f"demo config mini-os8 at 256x512 ({source})", engine, clip.frames, args.frames, args.repeats)
    postprocess_section()
    dis_section((256, 512), 6)
    if not args.skip_paper:
        paper = random_engine("deeplabv2-r101", (512, 1024), CLASS_SETS["cityscapes"])
        big = generate_clip("source", frames=args.paper_frames, size=(512, 1024), seed=5)
        model_section("paper config deeplabv2-r101 at 512x1024 (random init, 19 classes)", paper, big.frames,
                      args.paper_frames, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
