"""`vss eval --video V --labels DIR`: mIoU, per-class IoU and temporal consistency of a checkpoint on a clip.

Prints one JSON object: ``{"miou", "per_class", "tc", "frames", ...}``. The labels directory holds
``000000.png`` ... (palette-mode PNGs as written by `vss synth`, or greyscale index PNGs; 255 = ignore).
``tc`` is ``tc_pixel_agreement`` (``adaptation.metrics``): the share (percent) of valid pixels whose
prediction agrees with the previous frame's prediction warped by the flow provider (zero flow under
``--flow none``).

Other data sources (e.g. ``--data SPEC``) can be added as further options handled in ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.cli import CLIError

from .runtime import add_progress_argument, add_threads_argument
from .segment import add_model_arguments, load_engine, make_flow, positive_int, progress_bar

if TYPE_CHECKING:
    from models.flow import FlowProvider
    from service.engine import Engine


def check_label_count(n_labels: int, n_frames: int, max_frames: int | None, video: Path, labels_dir: Path,
                      allow_mismatch: bool) -> str | None:
    """The labels must cover the video frame for frame (up to ``max_frames``): an error, or with
    ``allow_mismatch`` a warning to print (None when they match)."""
    cap = max_frames if max_frames is not None else max(n_labels, n_frames)
    if min(n_labels, cap) == min(n_frames, cap):
        return None
    scored = min(n_labels, n_frames, cap)
    message = (f"the labels do not match the video: {n_labels} label PNGs in {labels_dir} but {n_frames} frames in "
               f"{video}")
    if not allow_mismatch:
        raise CLIError(f"{message}; pass --allow-mismatch to score the {scored} frames that have both")
    return f"{message}; scoring the {scored} frames that have both (--allow-mismatch)"


def evaluate_video(engine: Engine, flow: FlowProvider, video: Path, labels_dir: Path,
                   max_frames: int | None = None, progress: Any = None,
                   allow_mismatch: bool = False) -> dict[str, Any]:
    """Stream the video through the model and score every frame that has a label PNG.

    Label PNGs must be numbered 000000.png ... without gaps and match the video's frame count (up to
    ``max_frames``); a mismatch is an error unless ``allow_mismatch`` (then a warning on stderr).
    """
    from adaptation.metrics import TemporalConsistency, confusion_matrix, miou
    from models.classes import read_label_png
    from service.stream_segmenter import StreamSegmenter, resize_rgb
    from service.video_io import read_frames

    if not labels_dir.is_dir():
        raise CLIError(f"labels directory not found: {labels_dir}")
    n_labels = 0
    while (labels_dir / f"{n_labels:06d}.png").is_file():
        n_labels += 1
    if n_labels == 0:
        raise CLIError(f"no label PNGs (000000.png ...) in {labels_dir}")
    total = len(list(labels_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")))
    if total != n_labels:
        raise CLIError(f"the label PNGs in {labels_dir} have a gap: {n_labels:06d}.png is missing but {total} are "
                       "numbered")
    classes = list(engine.meta["classes"])
    segmenter = StreamSegmenter(engine, flow)
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    tc, scored = TemporalConsistency(), 0
    prev_pred = prev_frame = None
    # Every frame is decoded (up to max_frames) to count them: container frame counts can be estimates.
    limit, decoded = max_frames, 0
    for i, frame in enumerate(read_frames(video, max_frames=limit)):
        decoded += 1
        if i >= n_labels:
            continue
        path = labels_dir / f"{i:06d}.png"
        label = read_label_png(path)
        segmenter.output_size = label.shape
        pred = segmenter.step(frame).labels
        conf += confusion_matrix(pred, label, len(classes))
        small = resize_rgb(frame, label.shape)
        if prev_pred is not None:
            motion = flow(prev_frame, small)
            motion = np.zeros((*label.shape, 2), np.float32) if motion is None else motion
            tc.add(pred, prev_pred, motion)
        prev_pred, prev_frame = pred, small
        scored += 1
        if progress is not None:
            progress(scored, min(limit or n_labels, n_labels))
    warning = check_label_count(n_labels, decoded, max_frames, video, labels_dir, allow_mismatch)
    if warning:
        print(f"vss: warning: {warning}", file=sys.stderr)
    if scored == 0:
        raise CLIError(f"no frame of {video} has a label in {labels_dir}")
    scores, tc_pixel = miou(conf, classes), tc.tc_pixel_agreement()
    return {"miou": round(float(scores["miou"]), 2), "per_class": scores["per_class"],
            "tc": None if tc_pixel is None else round(tc_pixel, 2), "frames": scored,
            "model_version": engine.version, "flow": getattr(flow, "name", type(flow).__name__)}


def run_data(args: argparse.Namespace) -> int:
    """``--data SPEC``: mIoU per class and TC on a dataset's validation split (adaptation.evaluate)."""
    from adaptation.datasets import DatasetError
    from adaptation.evaluate import evaluate_checkpoint
    from models.checkpoint import CheckpointError

    from models.config import DEMO_MODEL_DIR

    checkpoint = args.checkpoint if args.checkpoint is not None else DEMO_MODEL_DIR
    if not (checkpoint / "meta.json").is_file():
        raise CLIError(f"checkpoint directory not found or incomplete: {checkpoint}")
    try:
        result = evaluate_checkpoint(checkpoint, args.data, split=args.split, flow=args.data_flow,
                                     flow_dir=args.flow_dir, max_items=args.max_items, device=args.device,
                                     native_labels=args.native_labels)
    except (DatasetError, CheckpointError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(result))
    return 0


def run(args: argparse.Namespace) -> int:
    from .runtime import apply_threads

    if args.data is not None:
        if args.video is not None:
            raise CLIError("give either --video/--labels or --data, not both")
        apply_threads(args)
        return run_data(args)
    if args.video is None or args.labels is None:
        raise CLIError("eval needs --video V and --labels DIR (or --data SPEC)")
    if not args.video.is_file():
        raise CLIError(f"video not found: {args.video}")
    apply_threads(args)
    engine = load_engine(args.checkpoint, args.device)
    flow = make_flow(args)
    with progress_bar("eval", not args.no_progress) as progress:
        result = evaluate_video(engine, flow, args.video, args.labels, args.max_frames, progress,
                                allow_mismatch=args.allow_mismatch)
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score a checkpoint on a labelled clip (mIoU, temporal consistency)",
                       description="Score a checkpoint on a video with label PNGs; prints JSON.")
    p.add_argument("--video", type=Path, default=None, metavar="V", help="input video")
    p.add_argument("--labels", type=Path, default=None, metavar="DIR", help="directory of label PNGs 000000.png ...")
    add_model_arguments(p)
    p.add_argument("--max-frames", type=positive_int, default=None, metavar="N", help="score at most N frames")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="score the frames that have a label when the label count differs from the video's frame "
                        "count (default: an error)")
    add_threads_argument(p)
    add_progress_argument(p)
    data = p.add_argument_group("dataset evaluation (instead of --video)")
    data.add_argument("--data", default=None, metavar="SPEC",
                      help="viper:PATH, synthia-seq:PATH, cityscapes-seq:PATH or synthetic:STYLE")
    data.add_argument("--split", default="val", help="dataset split (default val)")
    data.add_argument("--data-flow", default=None, choices=("precomputed", "dis", "gt", "none"),
                      help="flow for --data (default: gt for synthetic, precomputed DA-VSN files otherwise)")
    data.add_argument("--flow-dir", default=None, metavar="DIR", help="directory of precomputed flow files")
    data.add_argument("--max-items", type=positive_int, default=None, metavar="N", help="evaluate N items at most")
    data.add_argument("--native-labels", action="store_true",
                      help="score at the labels' own resolution (DA-VSN protocol) instead of the input size")
    p.set_defaults(func=run)
    return p
