"""`vss import-davsn PATH --classes viper|synthia -o DIR`: convert a released DA-VSN / TPS ``.pth``.

The file is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling) and written as a vss
checkpoint directory (safetensors + meta.json) for the paper configuration ``deeplabv2-r101``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli import CLIError


def run(args: argparse.Namespace) -> int:
    from models.davsn import import_davsn

    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise CLIError(f"refusing to overwrite non-empty {args.output}")
    _, meta = import_davsn(args.path, args.classes, args.output)
    print(json.dumps({"checkpoint": str(args.output), "classes": meta["classes"],
                      "input_size": meta["input_size"], "architecture": meta["architecture"]["backbone"]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-davsn", help="convert a DA-VSN / TPS .pth checkpoint",
                       description="Convert a released DA-VSN or TPS ACCEL checkpoint into a vss checkpoint.")
    p.add_argument("path", type=Path, metavar="PATH", help="the released .pth file")
    p.add_argument("--classes", required=True, choices=("viper", "synthia"),
                   help="label space: viper (15 classes) or synthia (12 classes)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="new checkpoint directory")
    p.set_defaults(func=run)
