"""`vss segment VIDEO -o OUT`: segment a video file into label PNGs (zip), an overlay MP4 or JSON stats.

Also home of the helpers the other file-based commands share: loading a checkpoint into an engine,
flow provider options and the TTY-only progress bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from models.config import DEMO_MODEL_DIR, parse_hxw
from service.cli import CLIError

if TYPE_CHECKING:  # heavy imports (torch) stay out of `vss --help`
    from models.flow import FlowProvider
    from service.engine import TorchEngine

FLOW_CHOICES = ("dis", "dis-ultrafast", "dis-fast", "dis-medium", "none", "raft", "raft-large")


def positive_int(text: str) -> int:
    """argparse type for counts and strides."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def hxw(min_side: int = 1, max_side: int | None = None) -> Callable[[str], tuple[int, int]]:
    """argparse type for ``HxW`` sizes (e.g. 256x512) with sides in ``min_side..max_side``."""
    def parse(text: str) -> tuple[int, int]:
        try:
            return parse_hxw(text, min_side, max_side)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --flow, --raft-weights, --device: shared by segment, eval and demo."""
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                        help="checkpoint directory (model.safetensors + meta.json); default: the bundled demo model")
    parser.add_argument("--flow", default="dis", choices=FLOW_CHOICES,
                        help="optical flow between consecutive frames (default: dis, OpenCV DIS on the CPU)")
    parser.add_argument("--raft-weights", type=Path, default=None, metavar="PATH",
                        help="local torchvision RAFT weights for --flow raft (nothing is downloaded)")
    parser.add_argument("--device", default="cpu", help="torch device for the network (default: cpu)")


def load_engine(checkpoint: Path | None, device: str = "cpu") -> TorchEngine:
    """Load a checkpoint directory (default: the demo model) into a torch engine."""
    from models.checkpoint import load_checkpoint
    from service.engine import TorchEngine

    directory = checkpoint if checkpoint is not None else DEMO_MODEL_DIR
    if checkpoint is None and not (directory / "meta.json").is_file():
        raise CLIError(f"the bundled demo model is missing ({directory}); pass --checkpoint DIR")
    if not directory.is_dir():
        raise CLIError(f"checkpoint directory not found: {directory}")
    model, meta = load_checkpoint(directory)
    try:
        return TorchEngine(model, meta, version=directory.name, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown or unavailable device
        raise CLIError(f"cannot use device {device!r}: {str(e).splitlines()[0]}") from e


def make_flow(args: argparse.Namespace) -> FlowProvider:
    """The flow provider named by --flow (RAFT needs --raft-weights)."""
    from models.flow import build_flow

    weights = str(args.raft_weights) if args.raft_weights is not None else None
    if args.flow.startswith("raft") and weights is None:
        raise CLIError("--flow raft needs --raft-weights PATH (local torchvision RAFT weights)")
    try:
        return build_flow(args.flow, raft_weights=weights)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # torch.load / load_state_dict raise many types for a wrong or corrupt file
        raise CLIError(f"cannot load RAFT weights {weights}: not a torchvision RAFT state dict "
                       f"({type(e).__name__})") from e


@contextmanager
def progress_bar(label: str, enabled: bool = True, unit: str = "frame"
                 ) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm ``progress(done, total)`` callback (rate and ETA) when ``enabled`` and stderr is a terminal,
    else ``None``."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


FORMATS = ("zip", "mp4", "json")


def output_format(output: Path, explicit: str | None) -> str:
    """The format from ``--format`` and OUT's suffix: they must agree; an unknown suffix needs ``--format``."""
    suffix = output.suffix.lower().lstrip(".")
    if explicit is not None:
        if suffix in FORMATS and suffix != explicit:
            raise CLIError(f"--format {explicit} but the output is named {output.name}: use a .{explicit} name")
        return explicit
    if suffix in FORMATS:
        return suffix
    if suffix:
        raise CLIError(f"cannot tell the output format from {output.name!r}: name it .zip (label PNGs), .mp4 "
                       "(overlay video) or .json (class statistics), or pass --format")
    return "zip"


def run(args: argparse.Namespace) -> int:
    from .runtime import apply_threads, show_progress

    if args.output.is_dir():
        raise CLIError(f"output {args.output} is a directory; give a file name")
    fmt = output_format(args.output, args.format)
    if not args.video.is_file():
        raise CLIError(f"video not found: {args.video}")
    if args.server is not None:
        from .remote import segment

        return segment(args, fmt, show_progress(args.no_progress))
    from service.video_segmenter import segment_video

    apply_threads(args)
    engine = load_engine(args.checkpoint, args.device)
    flow = make_flow(args)
    with progress_bar("segment", not args.no_progress) as progress:
        try:
            summary = segment_video(engine, flow, args.video, args.output, fmt, max_frames=args.max_frames,
                                    stride=args.stride, progress=progress)
        except OSError as e:
            raise CLIError(f"cannot write {args.output}: {e.strerror or e}") from e
    print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .runtime import add_progress_argument, add_server_arguments, add_threads_argument

    p = sub.add_parser("segment", help="segment a video file (here, or on a server with --server)",
                       description="Segment a video into label PNGs (zip), an overlay MP4 or per-frame JSON stats, "
                                   "here or on a vss server (--server URL).")
    p.add_argument("video", type=Path, metavar="VIDEO", help="input video (any container/codec FFmpeg decodes)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="output file: .zip, .mp4 or .json (another name needs --format)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from OUT's extension; zip when it has none)")
    add_model_arguments(p)
    p.add_argument("--max-frames", type=positive_int, default=None, metavar="N", help="segment at most N frames")
    p.add_argument("--stride", type=positive_int, default=1, metavar="K", help="segment every K-th frame")
    add_threads_argument(p)
    add_progress_argument(p)
    add_server_arguments(p)
    p.set_defaults(func=run)
