"""`vss export-onnx --checkpoint DIR [-o DIR]`: write model.onnx + fusion.onnx and check them against torch."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli import CLIError

if TYPE_CHECKING:  # torch stays out of `vss --help`
    from models.accel import AccelSegmenter

MIN_AGREEMENT = 0.995


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="export a checkpoint to ONNX (per-frame network + fusion step)",
                       description="Export a checkpoint to ONNX. By default the graphs go into the checkpoint "
                                   "directory, so a registry version carries them; then ONNX Runtime is "
                                   "checked against torch on a random frame.")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="DIR",
                   help="output directory (default: the checkpoint directory)")
    p.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy",
                   help="torch exporter: legacy (TorchScript, default, < 1 s) or dynamo (onnxscript, 10-40 s)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; legacy caps at 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.checkpoint import CheckpointError, load_checkpoint
    from models.onnx_export import ExportError, export_onnx

    if not args.checkpoint.is_dir():
        raise CLIError(f"not a checkpoint directory: {args.checkpoint}")
    try:
        model, meta = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    out = args.output if args.output is not None else args.checkpoint
    started = time.perf_counter()
    try:
        manifest = export_onnx(model, out, tuple(meta["input_size"]), meta.get("sha256"), args.exporter, args.opset)
    except ExportError as e:
        raise CLIError(str(e)) from e
    print(f"exported {out / manifest['frame']} and {out / manifest['fusion']} "
          f"({args.exporter}, opset {manifest['opset']}, {time.perf_counter() - started:.1f} s)")
    if args.no_verify:
        return 0
    agreement, rel = verify(model, meta, out)
    print(f"onnxruntime vs torch: argmax agreement {agreement:.4%}, max relative logit error {rel:.2e}")
    if agreement < MIN_AGREEMENT:
        raise CLIError(f"ONNX output disagrees with torch on {1 - agreement:.2%} of pixels")
    return 0


def verify(model: AccelSegmenter, meta: dict[str, Any], onnx_dir: Path) -> tuple[float, float]:
    """Fused-logit argmax agreement and max relative error of ONNX Runtime vs torch on random frames."""
    import numpy as np

    from service.engine import TorchEngine
    from service.onnx_engine import OnnxEngine

    h, w = meta["input_size"]
    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 255, (2, 3, h, w)).astype(np.float32)
    flow = rng.normal(0, 2, (1, 2, h, w)).astype(np.float32)
    torch_engine = TorchEngine(model, meta, "export-check", "cpu")
    onnx_engine = OnnxEngine(onnx_dir, meta, "export-check", device="cpu")
    outs = []
    for engine in (torch_engine, onnx_engine):
        logits = engine.frame_logits(frames)
        outs.append(engine.fuse(logits[1:], logits[:1], flow))
    ref, got = outs
    rel = float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-12))
    return float((ref.argmax(1) == got.argmax(1)).mean()), rel
