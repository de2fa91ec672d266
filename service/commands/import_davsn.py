"""`vss import-davsn PATH --classes viper|synthia -o DIR`: convert a released DA-VSN / TPS ``.pth``.

The file is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling) and written as a vss
checkpoint directory (safetensors + meta.json) for the paper configuration ``deeplabv2-r101``.
``--stats-from`` also stores the model's source statistics (``models.source_stats``), computed on
labeled frames the user has: a directory of ``*.npz`` clips (``frames``, ``labels``; the
``VSS_VAL_DIR`` format) or a dataset spec (``viper:/data/Viper``, ``synthia-seq:/data/SynthiaSeq``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from service.cli import CLIError


def labeled_source_frames(source: str, size: tuple[int, int], classes: list[str],
                          count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` evenly spaced labeled frames at the model input ``size`` from an npz directory or a dataset spec."""
    from adaptation.clips import prepare_clip
    from adaptation.datasets import DatasetError, build_dataset, label_space_of

    frames: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if Path(source).is_dir():
        files = sorted(Path(source).glob("*.npz"))
        if not files:
            raise CLIError(f"--stats-from {source}: no *.npz clips (frames, labels) in that directory")
        for path in files:
            try:
                with np.load(path, allow_pickle=False) as data:
                    clip = prepare_clip(data["frames"], size, flows=np.zeros((*data["frames"].shape[:3], 2),
                                                                             np.float32), labels=data["labels"])
            except (OSError, KeyError, ValueError) as e:
                raise CLIError(f"--stats-from {path.name}: {e}") from e
            assert clip.labels is not None
            frames += list(clip.frames)
            labels += list(clip.labels)
    else:
        try:
            ds = build_dataset(source, "train", size, flow="none", label_space=label_space_of(classes))
        except (DatasetError, ValueError) as e:
            raise CLIError(f"--stats-from {source}: {e}") from e
        for i in np.linspace(0, len(ds) - 1, min(count, len(ds))).round().astype(int):
            item = ds[int(i)]
            frames.append(item["cur"].permute(1, 2, 0).clamp(0, 255).round().byte().numpy())
            labels.append(item["label"].numpy())
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return [frames[i] for i in idx], [labels[i] for i in idx]


def run(args: argparse.Namespace) -> int:
    from models.checkpoint import add_source_stats
    from models.davsn import import_davsn

    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise CLIError(f"refusing to overwrite non-empty {args.output}")
    if args.stats_frames < 1:
        raise CLIError(f"--stats-frames must be >= 1, got {args.stats_frames}")
    labeled = None
    if args.stats_from:  # read first: a bad --stats-from writes nothing
        from models.classes import CLASS_SETS
        from models.davsn import DAVSN_INPUT_SIZE

        labeled = labeled_source_frames(args.stats_from, DAVSN_INPUT_SIZE, list(CLASS_SETS[args.classes]),
                                        args.stats_frames)
    model, meta = import_davsn(args.path, args.classes, args.output)
    out: dict[str, Any] = {"checkpoint": str(args.output), "classes": meta["classes"],
                           "input_size": meta["input_size"], "architecture": meta["architecture"]["backbone"]}
    if labeled is not None:
        from adaptation.source_stats import compute_source_stats

        frames, labels = labeled
        stats = compute_source_stats(model, frames, labels, provenance={"source": "vss import-davsn",
                                                                        "data": str(args.stats_from)})
        add_source_stats(args.output, stats)
        out["source_stats"] = {"frames": stats.frames}
    print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-davsn", help="convert a DA-VSN / TPS .pth checkpoint",
                       description="Convert a released DA-VSN or TPS ACCEL checkpoint into a vss checkpoint.")
    p.add_argument("path", type=Path, metavar="PATH", help="the released .pth file")
    p.add_argument("--classes", required=True, choices=("viper", "synthia"),
                   help="label space: viper (15 classes) or synthia (12 classes)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="new checkpoint directory")
    p.add_argument("--stats-from", metavar="DIR|SPEC",
                   help="also store source statistics computed on labeled frames: a directory of *.npz clips "
                        "(frames, labels) or a dataset spec such as viper:/data/Viper")
    p.add_argument("--stats-frames", type=int, default=16, metavar="N",
                   help="labeled frames for --stats-from (evenly spaced; default 16)")
    p.set_defaults(func=run)
