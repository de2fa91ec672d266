"""Routing benchmark: what per-domain routing adds to a stream frame, and how well it picks.

    .venv/bin/python bench/routing.py [--frames 60] [--threads 2]

1. Cost per frame of ``StreamRouter.pick`` (service/routing.py) at three frame sizes: with no domain
   version (the path of every server without domain versions: nothing is computed) and with 4 domain
   versions (frame signature + EMA + distances), the signature on every frame and on every 4th (the
   default ``route_sample_every``).
2. Routing accuracy on the synthetic styles: domain versions for fog, night and noise-blur (each signature
   the mean over 2 clips x 4 frames, seeds 0-1), the base without a signature (threshold only). For fresh
   clips (seeds 10-14) of every style including source and recolor, the share of frames served by the
   right version (source and recolor: the base) after the first frame and after 10 frames; and how many
   frames after a change of style the stream is served by the new style's version.

OpenCV is pinned to ``--threads``. Prints median and min over repeats (min: the unloaded cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation.synth.generator import generate_clip  # noqa: E402
from models.signature import VERSION, clip_signature  # noqa: E402
from service.domains import Domain, Route, RouteTable  # noqa: E402
from service.routing import DomainRoutes, StreamRouter  # noqa: E402

STYLES = ("fog", "night", "noise-blur")
SIZES = ((64, 128), (256, 512), (720, 1280))


class _Stub:
    """Stands in for an engine: routing only reads ``version``."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.meta = {}


def _routes(table: RouteTable, sample_every: int = 4) -> DomainRoutes:
    routes = DomainRoutes(registry=None, factory=None, sample_every=sample_every)  # type: ignore[arg-type]
    routes.table = table
    return routes


def _table(size: tuple[int, int], n: int) -> RouteTable:
    sigs = {s: clip_signature(np.concatenate([generate_clip(s, frames=4, size=size, seed=k).frames
                                              for k in (0, 1)])) for s in STYLES}
    routes = [Route(f"v{i + 2:04d}", Domain(s, 2, sigs[s]), _Stub(f"v{i + 2:04d}"))  # type: ignore[arg-type]
              for i, s in enumerate(STYLES)]
    while len(routes) < n:  # a fourth version: a copy of the first under another name
        routes.append(Route(f"v{len(routes) + 2:04d}", routes[0].domain, _Stub(f"v{len(routes) + 2:04d}")))
    return RouteTable("v0001", None, tuple(routes[:n]))


def cost(frames: int) -> None:
    base = _Stub("v0001")
    print("ms per frame of StreamRouter.pick (median / min over 5 repeats)")
    print(f"{'size':>10}  {'no domain versions':>20}  {'4 versions, every frame':>24}  "
          f"{'4 versions, every 4th':>22}")
    four = _table((128, 256), 4)
    for size in SIZES:
        clip = [np.ascontiguousarray(f) for f in generate_clip("fog", frames=8, size=size, seed=3).frames]
        row = []
        for table, every in ((RouteTable(), 4), (four, 1), (four, 4)):
            runs = []
            for _ in range(5):
                router = StreamRouter(_routes(table, every), "bench")
                start = time.perf_counter()
                for i in range(frames):
                    router.pick(base, clip[i % len(clip)])  # type: ignore[arg-type]
                runs.append((time.perf_counter() - start) * 1000 / frames)
            row.append(f"{statistics.median(runs):.4f} / {min(runs):.4f}")
        print(f"{size[0]}x{size[1]:<6}  {row[0]:>20}  {row[1]:>24}  {row[2]:>22}")


def accuracy() -> None:
    table = _table((128, 256), 3)
    expected = {"source": "v0001", "recolor": "v0001", **{r.domain.name: r.version for r in table.routes}}
    print("\nshare of frames served by the right version (5 clips x 16 frames per style, 128x256)")
    print(f"{'style':>11}  {'first frame':>11}  {'frames 10-16':>12}")
    for style in ("source", *STYLES, "recolor"):
        first, late = [], []
        for seed in range(10, 15):
            router = StreamRouter(_routes(table), "bench")
            picks = [router.pick(_Stub("v0001"), f).version  # type: ignore[arg-type]
                     for f in generate_clip(style, frames=16, size=(128, 256), seed=seed).frames]
            first.append(picks[0] == expected[style])
            late += [p == expected[style] for p in picks[9:]]
        print(f"{style:>11}  {np.mean(first):>11.0%}  {np.mean(late):>12.0%}")
    print(f"(signature definition version {VERSION}; max_distance 2.5, margin 0.25, EMA alpha 0.1, a signature "
          "every 4th frame)")


def switch_delay() -> None:
    """Frames after a change of style until the stream is served by the new style's version."""
    table = _table((128, 256), 3)
    expected = {"source": "v0001", **{r.domain.name: r.version for r in table.routes}}
    print("\nframes after a change of style until the new style's version serves (mean over 3 clips)")
    for a, b in (("source", "fog"), ("fog", "night"), ("night", "source"), ("noise-blur", "fog")):
        delays = []
        for seed in range(20, 23):
            router = StreamRouter(_routes(table), "bench")
            frames = list(generate_clip(a, frames=16, size=(128, 256), seed=seed).frames) + \
                list(generate_clip(b, frames=64, size=(128, 256), seed=seed).frames)
            picks = [router.pick(_Stub("v0001"), f).version for f in frames]  # type: ignore[arg-type]
            after = picks[16:]
            delays.append(next((i for i, p in enumerate(after) if p == expected[b]), len(after)))
        print(f"{a:>10} -> {b:<7} {np.mean(delays):5.1f} frames")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    cost(args.frames)
    accuracy()
    switch_delay()
    return 0


if __name__ == "__main__":
    sys.exit(main())
