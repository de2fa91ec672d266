"""Reproduce the bundled demo model: source-only training of `mini-os8` on the synthetic `source` style.

    python -m adaptation.make_demo -o service/demo_model --minutes 12
    python -m adaptation.make_demo --stats-only service/demo_model   # add source statistics, same weights

Trains on random crops of 256x512 synthetic clips with exact flow (ACCEL clip mode: frame t with
gradients, t-1 without, fused logits supervised), then evaluates on held-out source clips and every
target style and records the numbers in the checkpoint's provenance, and the source statistics
(``models.source_stats``) of the trained model on source clips beside the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from models.accel import build_model
from models.checkpoint import add_source_stats, load_checkpoint, make_meta, save_checkpoint
from models.config import get_config, parse_hxw
from models.source_stats import SourceStats

from . import synth
from .clip_eval import evaluate_clips
from .methods.supervised import SourceOnly
from .source_stats import compute_source_stats
from .trainer import TrainConfig, train

INPUT_SIZE = (256, 512)
TRAIN_SEEDS = range(1000, 1000 + 48)
EVAL_SEEDS = range(90_000, 90_006)
STATS_SEEDS = range(1000, 1000 + 16)  # source statistics: 16 of the training clips, 8 frames each


def source_stats(model: torch.nn.Module, seeds: range = STATS_SEEDS, frames: int = 8) -> SourceStats:
    """The model's statistics on source-style clips (``models.source_stats``)."""
    clips = [synth.generate_clip("source", frames, INPUT_SIZE, seed=s) for s in seeds]
    return compute_source_stats(model, [f for c in clips for f in c.frames], [lab for c in clips for lab in c.labels],
                                provenance={"source": "adaptation.make_demo", "style": "source",
                                            "seeds": f"{seeds.start}-{seeds.stop - 1}", "frames": str(frames)})


def crop_batches(clips: list[synth.Clip], batch: int, crop: tuple[int, int], seed: int) -> Iterator[dict[str, Any]]:
    """Endless random (t-1, t) pairs with labels and exact flow, randomly cropped and flipped."""
    rng = np.random.default_rng(seed)
    ch, cw = crop
    while True:
        cur, prev, flow, label = [], [], [], []
        for _ in range(batch):
            clip = clips[rng.integers(len(clips))]
            t = int(rng.integers(1, len(clip.frames)))
            h, w = clip.labels.shape[1:]
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            sl = (slice(y, y + ch), slice(x, x + cw))
            c, p, f, lab = clip.frames[t][sl], clip.frames[t - 1][sl], clip.flow[t][sl].copy(), clip.labels[t][sl]
            if rng.random() < 0.5:  # horizontal flip: mirror the images and negate dx
                c, p, f, lab = c[:, ::-1], p[:, ::-1], f[:, ::-1].copy(), lab[:, ::-1]
                f[..., 0] *= -1
            cur.append(c), prev.append(p), flow.append(f), label.append(lab)
        yield {
            "cur": torch.from_numpy(np.stack(cur)).permute(0, 3, 1, 2).float(),
            "prev": torch.from_numpy(np.stack(prev)).permute(0, 3, 1, 2).float(),
            "flow": torch.from_numpy(np.stack(flow)).permute(0, 3, 1, 2).float(),
            "label": torch.from_numpy(np.stack(label).astype(np.int64)),
        }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("-o", "--out", help="new checkpoint directory")
    what.add_argument("--stats-only", metavar="DIR",
                      help="add source statistics to the existing checkpoint DIR (its weights are not changed)")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=parse_hxw, default=(96, 192), metavar="HxW")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.stats_only:
        model, _ = load_checkpoint(args.stats_only)
        add_source_stats(args.stats_only, source_stats(model))
        print(json.dumps({"checkpoint": args.stats_only, "source_stats": "added"}))
        return
    t0 = time.time()
    clips = [synth.generate_clip("source", 8, INPUT_SIZE, seed=s) for s in TRAIN_SEEDS]
    print(f"generated {len(clips)} training clips in {time.time() - t0:.1f}s", flush=True)
    cfg = get_config("mini-os8", num_classes=len(synth.CLASSES))
    model = build_model(cfg)
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, optimizer="adam", poly_power=0.9, weight_decay=1e-4,
                       time_budget_s=args.minutes * 60, log_every=100)
    result = train(model, SourceOnly(head_lr_mult=1.0), crop_batches(clips, args.batch, args.crop, args.seed), tcfg,
                   on_log=lambda s, logs: print(f"step {s} loss {logs['loss']:.3f}", flush=True))
    model.eval()
    scores = {}
    for style in synth.list_styles():
        held = (synth.generate_clip(style, 12, INPUT_SIZE, seed=s) for s in EVAL_SEEDS)
        r = evaluate_clips(model, held, synth.CLASSES)
        scores[style] = {"miou": round(r["miou"], 2), "tc": round(r["tc"], 2)}
        print(f"{style:12s} mIoU {r['miou']:.1f}  tc {r['tc']:.1f}", flush=True)
    meta = make_meta(cfg, list(synth.CLASSES), synth.PALETTE.tolist(), INPUT_SIZE, parent=None,
                     source="adaptation.make_demo", train_style="source", steps=result.steps,
                     train_seconds=round(result.elapsed_s), eval=scores,
                     hyperparameters={k: v for k, v in vars(args).items() if k not in ("out", "stats_only")})
    model.source_stats = source_stats(model)
    save_checkpoint(args.out, model, meta)
    print(json.dumps({"out": args.out, "steps": result.steps, "eval": scores}))


if __name__ == "__main__":
    main()
