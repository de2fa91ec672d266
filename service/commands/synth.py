"""`vss synth`: render a synthetic labelled clip to an H.264 MP4, palette label PNGs and (optionally) flow.

Files: ``-o clip.mp4``; ``--labels DIR/000000.png ...`` (palette mode, pixel = class index);
``--flow DIR/000000.npy ...`` float32 (H, W, 2) backward flow t -> t-1 in pixels (frame 0: zeros), or
with ``--flow-format davsn`` DA-VSN files: int16 flow x 10 at half resolution, vectors rescaled.
Everything is written to temp paths and renamed into place only when the whole clip succeeded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.cli import CLIError

from .segment import hxw, positive_int


parse_size = hxw(8, 4096)  # argparse type of --size (also `vss demo`'s)


def encode_video(path: Path, fps: float) -> Callable[[np.ndarray], None]:
    """``write_video`` for ``adaptation.synth.files.write_clip``: H.264 at crf 18, written atomically."""
    def write(frames: np.ndarray) -> None:
        from service.video_io import VideoWriter

        with VideoWriter(path, fps, frames.shape[2], frames.shape[1], crf=18) as writer:
            for frame in frames:
                writer.write(frame)
    return write


def run(args: argparse.Namespace) -> int:
    from adaptation.synth import generate_clip, list_styles
    from adaptation.synth.files import write_clip

    if args.list_styles:
        print("\n".join(list_styles()))
        return 0
    missing = [flag for flag, value in (("--style", args.style), ("-o", args.output), ("--labels", args.labels))
               if value is None]
    if missing:
        raise CLIError(f"synth needs {', '.join(missing)} (or --list-styles)")
    if args.style not in list_styles():
        raise CLIError(f"unknown style {args.style!r}; choose one of {', '.join(list_styles())}")
    if args.output.is_dir():
        raise CLIError(f"output {args.output} is a directory; give a .mp4 file name")
    clip = generate_clip(args.style, frames=args.frames, size=args.size, seed=args.seed)
    try:
        write_clip(clip, args.labels, args.flow, encode_video(args.output, args.fps), args.flow_format)
    except FileExistsError as e:
        raise CLIError(str(e)) from e
    except OSError as e:
        raise CLIError(f"cannot write the clip: {e.strerror or e}") from e
    print(json.dumps({"video": str(args.output), "labels": str(args.labels),
                      "flow": str(args.flow) if args.flow else None, "style": args.style,
                      "frames": int(clip.frames.shape[0]), "size": list(args.size), "seed": args.seed}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="render a synthetic labelled clip",
                       description="Render a procedural driving clip with exact labels and flow.")
    p.add_argument("--list-styles", action="store_true", help="print the style names and exit")
    p.add_argument("--style", default=None, help="domain style, e.g. source, fog, night, noise-blur, recolor")
    p.add_argument("--frames", type=positive_int, default=16, metavar="N", help="number of frames (default 16)")
    p.add_argument("--size", type=parse_size, default=(256, 512), metavar="HxW", help="frame size (default 256x512)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="clip.mp4", help="output MP4 (H.264)")
    p.add_argument("--labels", type=Path, default=None, metavar="DIR", help="directory for the label PNGs")
    p.add_argument("--flow", type=Path, default=None, metavar="DIR", help="directory for per-frame flow .npy files")
    p.add_argument("--flow-format", choices=("npy", "davsn"), default="npy",
                   help="npy: float32 (H, W, 2) pixels; davsn: int16 x10 at half resolution (default npy)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of the MP4 (default 10)")
    p.set_defaults(func=run)
