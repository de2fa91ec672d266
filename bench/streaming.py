"""Streaming benchmark: ms/frame of naive ACCEL vs streaming reuse, where the time goes, DIS presets.

    .venv/bin/python bench/streaming.py [--frames 12] [--paper-frames 3] [--skip-paper]

1. For the demo model config (``mini-os8`` at 256x512; the bundled weights if present, else random
   init) and the paper config (``deeplabv2-r101`` at 512x1024, random init): ms per frame of
   ``NaiveSegmenter`` (t and t-1 through the network every frame, as the research code does) against
   ``StreamSegmenter`` (t-1 logits cached), and the share of a streaming frame spent in decode, resize,
   flow, network, fusion, upsample + argmax, palette and encode.
2. Post-processing variants against the reference (torch bilinear upsample + argmax).
3. DIS presets against the synthetic generator's exact flow: EPE, label-warp accuracy and time.

Torch and OpenCV are pinned to 2 threads. Prints tables and ratios; asserts nothing.
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
from models.classes import CLASS_SETS, palette_for  # noqa: E402
from models.config import get_config  # noqa: E402
from models.flow import DISFlow  # noqa: E402
from service.engine import TorchEngine  # noqa: E402
from service.outputs import label_png  # noqa: E402
from service.pipeline import (  # noqa: E402
    NaiveSegmenter,
    StreamSegmenter,
    class_fractions,
    labels_from_logits,
    overlay,
    resize_rgb,
)
from service.video import VideoWriter, read_frames  # noqa: E402

THREADS = 2
DEMO_DIR = Path(__file__).resolve().parent.parent / "service" / "demo_model"


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
    """Engine wrapper recording network and fusion time separately."""

    def __init__(self, engine: TorchEngine, sink: dict[str, list[float]]) -> None:
        self.version, self.meta, self.backend = engine.version, engine.meta, engine.backend
        self.frame_logits = Timed(engine.frame_logits, "network", sink)
        self.fuse = Timed(engine.fuse, "fuse", sink)


def demo_engine() -> tuple[TorchEngine, str]:
    if (DEMO_DIR / "meta.json").is_file():
        model, meta = load_checkpoint(DEMO_DIR)
        return TorchEngine(model, meta, "demo"), "bundled demo weights"
    return random_engine("mini-os8", (256, 512), CLASS_SETS["synthetic"]), "random init (no demo model yet)"


def random_engine(config: str, size: tuple[int, int], classes: tuple[str, ...]) -> TorchEngine:
    torch.manual_seed(0)
    cfg = get_config(config, num_classes=len(classes))
    meta = make_meta(cfg, list(classes), palette_for(classes), size)
    return TorchEngine(build_model(cfg), meta, config)


def run_stream(segmenter: StreamSegmenter, frames: list[np.ndarray]) -> list[float]:
    """ms per step over the non-key frames."""
    times = []
    for i, frame in enumerate(frames):
        start = time.perf_counter()
        segmenter.step(frame)
        if i > 0:
            times.append((time.perf_counter() - start) * 1000)
    return times


def stage_breakdown(engine: TorchEngine, video: Path, n: int) -> dict[str, float]:
    """Median ms per streaming frame for each stage, decode and output encoding included."""
    sink: dict[str, list[float]] = defaultdict(list)
    timed = TimedEngine(engine, sink)
    seg = StreamSegmenter(timed, Timed(DISFlow(), "flow", sink))
    palette = np.asarray(engine.meta["palette"], np.uint8)
    frames_iter = iter(read_frames(video, max_frames=n))
    with tempfile.TemporaryDirectory() as tmp:
        writer: VideoWriter | None = None
        while True:
            start = time.perf_counter()
            frame = next(frames_iter, None)
            if frame is None:
                break
            sink["decode"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            result = seg.step(frame)
            sink["step"].append((time.perf_counter() - start) * 1000)
            # the parts of step() not wrapped above, re-run on the same data to time them alone
            start = time.perf_counter()
            resize_rgb(frame, tuple(engine.meta["input_size"]))
            sink["resize"].append((time.perf_counter() - start) * 1000)
            logits = np.random.default_rng(0).standard_normal(
                (len(palette), *np.array(engine.meta["input_size"]) // 8)).astype(np.float32)
            start = time.perf_counter()
            labels = labels_from_logits(logits, frame.shape[:2])
            sink["upsample+argmax"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            class_fractions(labels, list(engine.meta["classes"]))
            sink["class fractions"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            blended = overlay(frame, result.labels, palette)
            sink["palette (overlay)"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            label_png(result.labels, palette)
            sink["encode PNG"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            if writer is None:
                writer = VideoWriter(Path(tmp) / "o.mp4", 10, frame.shape[1], frame.shape[0])
            writer.write(blended)
            sink["encode MP4"].append((time.perf_counter() - start) * 1000)
        if writer is not None:
            writer.close()
    # skip the keyframe (no flow, warm-up); the median of the rest
    return {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in sink.items()}


def model_section(title: str, engine: TorchEngine, clip_frames: np.ndarray, n: int, repeats: int) -> None:
    print(f"\n== {title} ==")
    frames = [np.ascontiguousarray(f) for f in clip_frames[:n]]
    with torch.inference_mode():
        engine.frame_logits(frames[0].transpose(2, 0, 1)[None].astype(np.float32))  # warm-up
    naive: list[float] = []
    stream: list[float] = []
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
        naive += run_stream(NaiveSegmenter(engine, DISFlow()), frames)
        stream += run_stream(StreamSegmenter(engine, DISFlow()), frames)
    print(f"{'ms/frame (non-key frames)':30s} {'median':>9s} {'min':>9s}")
    print(f"{'naive ACCEL (2 forwards/frame)':30s} {statistics.median(naive):9.1f} {min(naive):9.1f}")
    print(f"{'streaming reuse (1 forward)':30s} {statistics.median(stream):9.1f} {min(stream):9.1f}")
    print(f"{'speed-up naive/streaming':30s} {statistics.median(naive) / statistics.median(stream):8.2f}x "
          f"{min(naive) / min(stream):8.2f}x   (target >= 1.8x)")
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        with VideoWriter(video, 10, frames[0].shape[1], frames[0].shape[0], crf=18) as writer:
            for f in frames:
                writer.write(f)
        stages = stage_breakdown(engine, video, n)
    order = ["decode", "resize", "flow", "network", "fuse", "upsample+argmax", "class fractions",
             "palette (overlay)", "encode PNG", "encode MP4"]
    total = sum(stages[k] for k in order)
    print(f"{'stage':20s} {'ms/frame':>9s} {'share':>7s}   (streaming frame, decode and outputs included)")
    for k in order:
        print(f"{k:20s} {stages[k]:9.2f} {100 * stages[k] / total:6.1f}%")
    print(f"{'total':20s} {total:9.2f}   (step() alone: {stages['step']:.2f} ms)")


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
            fn(size)
            start = time.perf_counter()
            for _ in range(5):
                out = fn(size)
            ms = (time.perf_counter() - start) * 200
            print(f"{size[0]}x{size[1]:<5d} {name:42s} {ms:7.2f} ms   differs on {100 * (out != ref).mean():6.3f}%")


def dis_section(size: tuple[int, int], frames: int) -> None:
    print(f"\n== DIS presets vs the generator's exact flow ({size[0]}x{size[1]}, {frames} frames x 3 styles) ==")
    clips = [generate_clip(style, frames=frames, size=size, seed=11) for style in ("source", "fog", "recolor")]
    print(f"{'preset':10s} {'EPE px':>8s} {'EPE<1px %':>10s} {'label warp acc %':>17s} {'ms/pair':>8s} {'(min)':>7s}")
    zero_acc = []
    for preset in ("ultrafast", "fast", "medium"):
        dis = DISFlow(preset)
        epe, inlier, acc, ms = [], [], [], []
        for clip in clips:
            for t in range(1, frames):
                start = time.perf_counter()
                est = dis(clip.frames[t - 1], clip.frames[t])
                ms.append((time.perf_counter() - start) * 1000)
                err = np.linalg.norm(est - clip.flow[t], axis=-1)
                epe.append(err.mean())
                inlier.append((err < 1).mean())
                warped, valid = warp_labels_np(clip.labels[t - 1], est)
                acc.append((warped == clip.labels[t])[valid].mean())
                if preset == "ultrafast":
                    zero_acc.append((clip.labels[t - 1] == clip.labels[t]).mean())
        print(f"{preset:10s} {np.mean(epe):8.3f} {100 * np.mean(inlier):10.1f} {100 * np.mean(acc):17.2f} "
              f"{statistics.median(ms):8.2f} {min(ms):7.2f}")
    exact = [(warp_labels_np(c.labels[t - 1], c.flow[t])[0] == c.labels[t])[warp_labels_np(c.labels[t - 1],
              c.flow[t])[1]].mean() for c in clips for t in range(1, frames)]
    print(f"{'(exact)':10s} {0:8.3f} {100:10.1f} {100 * np.mean(exact):17.2f}")
    print(f"{'(no flow)':10s} {'':8s} {'':10s} {100 * np.mean(zero_acc):17.2f}")
    print(f"default preset in models/flow.py: DISFlow() -> {DISFlow().name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=12, help="frames for the demo config (default 12)")
    p.add_argument("--paper-frames", type=int, default=3, help="frames for the r101 config (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats for the demo config (default 3)")
    p.add_argument("--skip-paper", action="store_true", help="skip the slow deeplabv2-r101 512x1024 part")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)
    print(f"torch {torch.__version__}, {THREADS} threads; OpenCV {cv2.__version__}, {THREADS} threads")
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
