"""`vss synth`: render a synthetic labelled clip to an H.264 MP4, palette label PNGs and (optionally) flow.

Files: ``-o clip.mp4``; ``--labels DIR/000000.png ...`` (palette mode, pixel = class index);
``--flow DIR/000000.npy ...`` float32 (H, W, 2) backward flow t -> t-1 in pixels (frame 0: zeros), or
with ``--flow-format davsn`` DA-VSN files: int16 flow x 10 at half resolution, vectors rescaled.
Everything is written to temp paths and renamed into place only when the whole clip succeeded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.cli import CLIError

from .segment import positive_int

if TYPE_CHECKING:
    from adaptation.synth import Clip


def parse_size(text: str) -> tuple[int, int]:
    """argparse type for ``HxW`` (e.g. 256x512)."""
    parts = text.lower().split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x512, got {text!r}") from None
    if not (8 <= h <= 4096 and 8 <= w <= 4096):
        raise argparse.ArgumentTypeError(f"size {h}x{w} out of range (8..4096 per side)")
    return h, w


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    return tmp


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished staging directory onto ``final`` (which may exist only if empty)."""
    if final.exists():
        if not final.is_dir() or any(final.iterdir()):
            raise CLIError(f"refusing to overwrite non-empty {final}")
        final.rmdir()
    os.replace(tmp, final)


def write_clip(clip: Clip, video: Path, labels_dir: Path, flow_dir: Path | None, fps: float,
               flow_format: str = "npy") -> None:
    """Write a generated ``Clip`` (see ``adaptation.synth``) as MP4 + label PNGs (+ flow files)."""
    from models.flow import encode_davsn_flow
    from service.outputs import label_png
    from service.video import VideoWriter

    for d in (labels_dir, flow_dir):
        if d is not None and d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise CLIError(f"refusing to overwrite non-empty {d}")
    palette = np.asarray(_palette(), dtype=np.uint8)
    staged: list[Path] = []
    try:
        labels_tmp = _staging_dir(labels_dir)
        staged.append(labels_tmp)
        for i, labels in enumerate(clip.labels):
            (labels_tmp / f"{i:06d}.png").write_bytes(label_png(labels, palette, compress_level=6))
        flow_tmp = None
        if flow_dir is not None:
            flow_tmp = _staging_dir(flow_dir)
            staged.append(flow_tmp)
            for i, flow in enumerate(clip.flow):
                data = encode_davsn_flow(flow) if flow_format == "davsn" else flow.astype(np.float32)
                (flow_tmp / f"{i:06d}.npy").write_bytes(_npy_bytes(data))
        h, w = clip.frames.shape[1:3]
        with VideoWriter(video, fps, w, h, crf=18) as writer:
            for frame in clip.frames:
                writer.write(frame)
        _publish_dir(labels_tmp, labels_dir)
        staged.remove(labels_tmp)
        if flow_tmp is not None and flow_dir is not None:
            _publish_dir(flow_tmp, flow_dir)
            staged.remove(flow_tmp)
    finally:
        for d in staged:
            shutil.rmtree(d, ignore_errors=True)


def _palette() -> np.ndarray:
    from adaptation.synth import PALETTE

    return PALETTE


def run(args: argparse.Namespace) -> int:
    from adaptation.synth import generate_clip, list_styles

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
        write_clip(clip, args.output, args.labels, args.flow, args.fps, args.flow_format)
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
