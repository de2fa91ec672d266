"""`vss adapt`: source-free adaptation of a checkpoint to unlabeled videos, gated before it is written.

    vss adapt --method stpl --video a.mp4 b.mp4 -o adapted/ [--steps 200 --lr 1e-4 --time-budget 60]
              [--checkpoint IN] [--val-video v.mp4 --val-labels labels/]

IN defaults to the bundled demo model. OUT is a new checkpoint directory whose meta records the
parent, method, hyperparameters, a sha256 of the input data and the gate metrics. A candidate the
gate rejects is not written: the reasons are printed and the exit status is 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.classes import IGNORE_INDEX
from models.config import DEMO_MODEL_DIR, parse_hxw

EXIT_REJECTED = 3
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


# adaptation.sourcefree.SOURCE_FREE, spelled out so that building the parser does not import torch
# (tests/cli/test_cli_ux.py checks that the two agree).
METHODS = ("bn", "tent", "itcr", "stpl", "selftrain", "srcstats", "cotta")


def register(sub: argparse._SubParsersAction) -> None:
    from .runtime import add_progress_argument, add_server_arguments, add_threads_argument

    p = sub.add_parser("adapt", help="adapt a model to unlabeled target videos (source-free) and gate it, here or "
                                     "on a server", description=__doc__.split("\n\n")[0] + "\n\n" + SERVER_NOTE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="stpl", help="adaptation method (default: stpl)")
    p.add_argument("--video", nargs="+", default=None, metavar="V",
                   help="unlabeled target videos (with --server: added to the server's clip buffer first)")
    p.add_argument("--checkpoint", metavar="IN", help="parent checkpoint directory (default: the demo model)")
    p.add_argument("-o", "--out", default=None, metavar="OUT", help="new checkpoint directory to write (local runs)")
    p.add_argument("--steps", type=int, default=200, help="optimisation steps (default: 200)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    p.add_argument("--time-budget", type=float, metavar="S", help="stop training after S seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="(t-1, t) pairs per step (default: the method's)")
    p.add_argument("--crop", metavar="HxW", help="train on random HxW crops, or 'full' frames (default: the method's)")
    p.add_argument("--sampling", choices=("class-balanced", "random"), default="class-balanced")
    p.add_argument("--max-frames", type=int, default=300, help="frames decoded per video (default: 300)")
    p.add_argument("--stride", type=int, default=1, help="keep every STRIDE-th frame (default: 1)")
    p.add_argument("--flow", default="dis", help="flow provider at model input size: dis, dis-fast, none, ...")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --option fusion=concat --option ce_weight=0.5)")
    p.add_argument("--val-video", metavar="V", help="labeled validation video (makes the gate decide on mIoU)")
    p.add_argument("--val-labels", metavar="DIR", help="one label image per frame of --val-video (sorted names)")
    p.add_argument("--labeled-frames", type=int, default=0, metavar="K",
                   help="also train on K <= 4 frames of the labeled --val-video (the gate then scores on the same "
                        "clip, so its verdict is optimistic); local runs only")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no log lines")
    add_progress_argument(p)
    add_threads_argument(p)
    add_server_arguments(p)
    p.set_defaults(func=run)


SERVER_NOTE = """With --server URL the job runs on that server: the --video files (if any) are added to its clip
buffer, then it adapts its active model to the buffer, gates the candidate and publishes (and
activates) the new version itself; -o, --checkpoint, --val-* and --crop do not apply."""


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse (numbers, true/false), strings otherwise."""
    from service.cli import CLIError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def parse_crop(text: str | None) -> tuple[int, int] | Literal["full"] | None:
    """``HxW`` crops, ``full`` frames, or None: the method's default (``AdaptConfig.crop``)."""
    from service.cli import CLIError

    if text is None:
        return None
    if text == "full":
        return "full"
    try:
        return parse_hxw(text, min_side=8)
    except ValueError as e:
        raise CLIError(f"--crop expects HxW (e.g. 128x256, at least 8x8) or 'full': {e}") from None


def read_video(path: str, max_frames: int, stride: int) -> list[np.ndarray]:
    from service.cli import CLIError
    from service.video_io import read_frames

    if not Path(path).is_file():
        raise CLIError(f"video not found: {path}")
    frames = list(read_frames(path, max_frames=max_frames, stride=stride))
    if len(frames) < 2:
        raise CLIError(f"{path}: need at least 2 frames, got {len(frames)}")
    return frames


def read_label_image(path: Path, palette: list[list[int]]) -> np.ndarray:
    """Class-index image (grey or palette PNG), or an RGB colour image mapped through ``palette``."""
    from PIL import Image

    from service.cli import CLIError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "L", "I;16", "I"):
                return np.asarray(img).astype(np.uint8)
            rgb = np.asarray(img.convert("RGB"))
    except OSError as e:
        raise CLIError(f"cannot read label image {path}: {e}") from e
    out = np.full(rgb.shape[:2], IGNORE_INDEX, np.uint8)
    for idx, colour in enumerate(palette):
        out[(rgb == np.asarray(colour, np.uint8)).all(-1)] = idx
    return out


def read_labels(directory: str, palette: list[list[int]]) -> list[np.ndarray]:
    from service.cli import CLIError

    d = Path(directory)
    if not d.is_dir():
        raise CLIError(f"--val-labels must be a directory of label images: {directory}")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in LABEL_SUFFIXES)
    if not files:
        raise CLIError(f"no label images ({', '.join(LABEL_SUFFIXES)}) in {directory}")
    return [read_label_image(f, palette) for f in files]


def run(args: argparse.Namespace) -> int:
    from service.cli import CLIError

    from .runtime import apply_threads, show_progress
    from .segment import progress_bar

    if args.server is not None:
        from .remote import adapt as remote_adapt

        return remote_adapt(args, show_progress(args.no_progress or args.quiet))
    if args.out is None:
        raise CLIError("adapt needs -o OUT (the checkpoint directory to write), or --server URL")
    if not args.video:
        raise CLIError("adapt needs --video V [V ...] (unlabeled target videos)")
    apply_threads(args)  # before torch is imported, so that OpenMP reads the thread count too
    import torch

    from adaptation.clips import prepare_clip
    from adaptation.sourcefree import AdaptConfig, adapt
    from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
    from models.flow import build_flow

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"output {out} already exists and is not an empty directory")
    if (args.val_video is None) != (args.val_labels is None):
        raise CLIError("--val-video and --val-labels go together")
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    parse_crop(args.crop)
    if not 0 <= args.labeled_frames <= 4:
        raise CLIError(f"--labeled-frames must be between 0 and 4, got {args.labeled_frames}")
    if args.labeled_frames and args.val_video is None:
        raise CLIError("--labeled-frames needs the labeled clip: --val-video and --val-labels")
    if args.labeled_frames and args.method == "bn":
        raise CLIError("--labeled-frames needs a method that trains weights (not bn)")
    parent_dir = Path(args.checkpoint) if args.checkpoint else DEMO_MODEL_DIR
    try:
        parent, meta = load_checkpoint(parent_dir)
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    if args.method == "srcstats" and parent.source_stats is None:
        raise CLIError(f"{parent_dir} has no source statistics, which srcstats needs (vss train and make_demo "
                       "record them; vss import-davsn --stats-from computes them)")
    size = tuple(meta["input_size"])
    flow = build_flow(args.flow)
    bar = show_progress(args.no_progress or args.quiet)
    # With a progress bar (a terminal) the bar replaces the per-10-step log lines.
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    clips = []
    for v in args.video:
        frames = read_video(v, args.max_frames, args.stride)
        clips.append(prepare_clip(frames, size, flow_provider=flow))
        log(f"{v}: {len(frames)} frames")
    val = None
    if args.val_video:
        labels = read_labels(args.val_labels, meta["palette"])
        frames = read_video(args.val_video, len(labels), 1)
        if len(frames) != len(labels):
            raise CLIError(f"{args.val_video} has {len(frames)} frames but {args.val_labels} has {len(labels)} labels")
        val = [prepare_clip(frames, size, labels=np.stack(labels), flow_provider=flow)]
    cfg = AdaptConfig(method=args.method, options=parse_options(args.option), steps=args.steps, lr=args.lr,
                      time_budget_s=args.time_budget, seed=args.seed, batch_size=args.batch_size,
                      crop=parse_crop(args.crop), sampling=args.sampling, labeled_frames=args.labeled_frames)
    inputs = [{"path": Path(v).name, "sha256": sha256_file(Path(v))} for v in args.video]
    torch.manual_seed(args.seed)
    with progress_bar(f"adapt {args.method}", bar, unit="step") as progress:
        def on_log(step: int, logs: dict[str, float]) -> None:
            text = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "step")
            if progress is not None:
                progress(step, args.steps)
            else:
                log(f"step {step} {text}")

        result = adapt(parent, meta, clips, cfg, parent_ref=str(parent_dir.resolve()), val=val, labeled=val,
                       on_log=on_log,
                       on_progress=lambda stage, info: None if progress is not None else
                       log(f"[{stage}] {json.dumps(info)}"),
                       provenance={"inputs": inputs, "flow": args.flow, "parent_sha256": meta.get("sha256")})
    gate_metrics = {k: v for k, v in result.report.metrics.items() if not k.startswith("class_share")}
    log(f"gate: {'passed' if result.report.passed else 'REJECTED'} {json.dumps(gate_metrics)}")
    if not result.report.passed:
        print("vss: adapt: candidate rejected by the gate, nothing written:", file=sys.stderr)
        for reason in result.report.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return EXIT_REJECTED
    save_checkpoint(out, result.model, result.meta)
    print(str(out))
    return 0
