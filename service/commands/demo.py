"""`vss demo`: render a target-style synthetic clip, segment it with the bundled model, show the result.

Works offline on a fresh machine: the clip is generated procedurally and the model ships in the
package. Writes ``input.mp4`` and ``overlay.mp4`` into the output directory and prints the mIoU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service.cli import CLIError

from .runtime import add_progress_argument, add_threads_argument, apply_threads
from .segment import add_model_arguments, load_engine, make_flow, positive_int, progress_bar
from .synth import parse_size

DEMO_STYLE = "fog"  # a target domain the source-trained model has not seen
DEMO_SIZE = (256, 512)


def run(args: argparse.Namespace) -> int:
    from adaptation.metrics import confusion_matrix, miou
    from adaptation.synth import generate_clip, list_styles
    from service.outputs import Mp4Sink
    from service.stream_segmenter import StreamSegmenter
    from service.video_io import VideoWriter, read_frames

    if args.style not in list_styles():
        raise CLIError(f"unknown style {args.style!r}; choose one of {', '.join(list_styles())}")
    if args.output.exists() and not args.output.is_dir():
        raise CLIError(f"output {args.output} exists and is not a directory")
    apply_threads(args)
    engine = load_engine(args.checkpoint, args.device)
    flow = make_flow(args)
    classes = list(engine.meta["classes"])
    size = args.size
    clip = generate_clip(args.style, frames=args.frames, size=size, seed=args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    source, result = args.output / "input.mp4", args.output / "overlay.mp4"
    fps = 10.0
    with VideoWriter(source, fps, clip.frames.shape[2], clip.frames.shape[1], crf=18) as writer:
        for frame in clip.frames:
            writer.write(frame)
    palette = np.asarray(engine.meta["palette"], dtype=np.uint8).reshape(-1, 3)
    segmenter = StreamSegmenter(engine, flow)
    sink = Mp4Sink(result, classes, palette, fps)
    conf = np.zeros((len(classes), len(classes)), dtype=np.int64)
    latency = []
    try:
        with progress_bar("demo", not args.no_progress) as progress:
            for i, frame in enumerate(read_frames(source)):
                out = segmenter.step(frame)
                sink.add(frame, out)
                conf += confusion_matrix(out.labels, clip.labels[i], len(classes))
                latency.append(out.latency_ms)
                if progress is not None:
                    progress(i + 1, len(clip.frames))
        sink.finish({})
    except BaseException:
        sink.abort()
        raise
    scores = miou(conf, classes)
    worst = sorted((v, k) for k, v in scores["per_class"].items() if v is not None)[:2]
    print(f"{len(latency)} frames of the synthetic '{args.style}' style at {size[0]}x{size[1]}, "
          f"model {engine.version}, {np.median(latency):.0f} ms/frame")
    print(f"mIoU {scores['miou']:.1f}  (weakest: {', '.join(f'{k} {v:.0f}' for v, k in worst)})")
    if args.style != "source":
        print(f"(the model was trained on the 'source' style; '{args.style}' is a domain shift that the "
              "service's adaptation recovers from, see POST /v1/adapt)")
    print(f"overlay: {result.resolve()}")
    print(f"input:   {source.resolve()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="segment a generated target-style clip with the bundled model",
                       description="Generate a synthetic target-domain clip, segment it, write the overlay MP4.")
    p.add_argument("-o", "--output", type=Path, default=Path("vss-demo"), metavar="DIR",
                   help="output directory (default: ./vss-demo)")
    p.add_argument("--style", default=DEMO_STYLE, help=f"synthetic style (default {DEMO_STYLE})")
    p.add_argument("--frames", type=positive_int, default=24, metavar="N", help="clip length (default 24)")
    p.add_argument("--seed", type=int, default=7, help="clip seed (default 7)")
    p.add_argument("--size", type=parse_size, default=DEMO_SIZE, metavar="HxW", help="frame size (default 256x512)")
    add_model_arguments(p)
    add_threads_argument(p)
    add_progress_argument(p)
    p.set_defaults(func=run)
