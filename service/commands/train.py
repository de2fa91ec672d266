"""`vss train`: offline domain adaptation (or supervised training) of an ACCEL model on datasets.

    vss train --method davsn --source viper:/data/Viper --target cityscapes-seq:/data/Cityscapes \\
        --config deeplabv2-r101 --input-size 512x1024 --source-size 720x1280 --iters 40000 -o runs/davsn
    vss train --method tps --source synthetic:source --target synthetic:fog --init service/demo_model \\
        --input-size 128x256 --iters 500 -o runs/tps-fog

Several GPUs: ``torchrun --nproc_per_node K -m service.cli train ...`` (DistributedDataParallel; rank 0
logs and writes checkpoints). Re-running the same command resumes from the run's last checkpoint.
``RUN_DIR/best`` is a checkpoint directory for ``vss models import``. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

from service.cli import CLIError

from .segment import hxw

FLOW_MODES = ("precomputed", "dis", "gt", "none")


def key_value(text: str) -> tuple[str, Any]:
    """argparse type for KEY=VALUE; VALUE is a Python literal when it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip().replace("-", "_"), value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from adaptation.datasets import DatasetError
    from adaptation.offline import OfflineConfig, run_offline
    from models.checkpoint import CheckpointError

    from .runtime import apply_threads, show_progress

    if args.iters < 1 or args.batch < 1:
        raise CLIError("--iters and --batch must be >= 1")
    apply_threads(args)
    cfg = OfflineConfig(
        method=args.method, source=args.source, target=args.target, run_dir=args.output, flow=args.flow,
        source_flow_dir=args.source_flow_dir, target_flow_dir=args.target_flow_dir, iters=args.iters,
        batch=args.batch, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        poly_power=args.poly_power, grad_clip=args.grad_clip or None, aux_lr=args.aux_lr, amp=args.amp,
        config=args.config, input_size=args.input_size, source_size=args.source_size,
        init=str(args.init) if args.init else None, seed=args.seed, eval_every=args.eval_every,
        ckpt_every=args.ckpt_every, eval_items=args.eval_items, keep=args.keep, workers=args.workers,
        device=args.device, log_every=args.log_every, progress=show_progress(args.no_progress),
        method_args=dict(args.method_arg), dataset_args=dict(args.data_arg), stats_frames=args.stats_frames)
    try:
        summary = run_offline(cfg)
    except (DatasetError, CheckpointError) as e:
        raise CLIError(str(e)) from e
    except TypeError as e:  # a --method-arg the method does not take
        raise CLIError(f"bad --method-arg/--data-arg: {e}") from e
    if summary is not None:
        print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .runtime import add_progress_argument, add_threads_argument

    p = sub.add_parser("train", help="offline domain adaptation / supervised training on datasets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, metavar="M",
                   help="source-only, davsn, tps, i2vda or uvda (see adaptation/methods)")
    p.add_argument("--source", required=True, metavar="SPEC",
                   help="labelled source: viper:PATH, synthia-seq:PATH, cityscapes-seq:PATH or synthetic:STYLE")
    p.add_argument("--target", default=None, metavar="SPEC",
                   help="unlabelled target (its validation split is used for evaluation), e.g. synthetic:fog")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--flow", default=None, choices=FLOW_MODES,
                   help="flow source (default: gt for synthetic data, precomputed DA-VSN files otherwise)")
    p.add_argument("--source-flow-dir", default=None, metavar="DIR", help="precomputed flow files of the source")
    p.add_argument("--target-flow-dir", default=None, metavar="DIR", help="precomputed flow files of the target")
    p.add_argument("--iters", type=int, default=1000, metavar="N", help="optimisation steps (default 1000)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="clips per domain per step and process")
    p.add_argument("--lr", type=float, default=2.5e-4, help="base learning rate (heads x10; default 2.5e-4)")
    p.add_argument("--aux-lr", type=float, default=1e-4, help="discriminators' Adam learning rate")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--poly-power", type=float, default=0.9, help="poly LR decay power (0 = constant)")
    p.add_argument("--grad-clip", type=float, default=10.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--config", default="mini-os8", help="model config for a random init (default mini-os8)")
    p.add_argument("--input-size", type=hxw(32), default=(256, 512), metavar="HxW",
                   help="target (and evaluation) input size (default 256x512)")
    p.add_argument("--source-size", type=hxw(32), default=None, metavar="HxW", help="source input size")
    p.add_argument("--init", type=Path, default=None, metavar="CHECKPOINT_DIR",
                   help="start from this checkpoint (e.g. service/demo_model); default: random init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=nonneg_int, default=0, metavar="N",
                   help="evaluate on the target val split every N steps (0 = at the end only)")
    p.add_argument("--ckpt-every", type=nonneg_int, default=0, metavar="N",
                   help="checkpoint every N steps (0 = with each evaluation)")
    p.add_argument("--eval-items", type=int, default=None, metavar="N", help="evaluate on at most N items")
    p.add_argument("--keep", type=int, default=2, metavar="K", help="periodic checkpoints to keep")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data-loader worker processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--log-every", type=int, default=10, metavar="N", help="JSONL log interval in steps")
    p.add_argument("--stats-frames", type=nonneg_int, default=16, metavar="N",
                   help="labeled source frames whose statistics every checkpoint stores for source-free adaptation "
                        "(srcstats) and routing (default 16; 0: none)")
    add_progress_argument(p)
    add_threads_argument(p)
    p.add_argument("--method-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. ctcr=False, lambda_itcr=0.01, refine='consistency' (repeatable)")
    p.add_argument("--data-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="dataset option, e.g. clips=16 for synthetic data (repeatable)")
    p.set_defaults(func=run)
    return p
