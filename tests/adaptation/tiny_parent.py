"""A briefly trained tiny parent, the clip it adapts to and that clip as an MP4: what the source-free
driver's tests (tests/adaptation/test_sourcefree.py) and `vss adapt`'s (tests/cli/test_adapt_command.py) share."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptation import synth
from adaptation.clips import PairSampler, prepare_clip
from adaptation.methods.supervised import SourceOnly
from adaptation.trainer import TrainConfig, train
from models.accel import build_model
from models.checkpoint import make_meta, save_checkpoint
from models.classes import palette_for
from models.config import get_config
from service.video_io import VideoWriter

SIZE = (64, 128)


def target_clip() -> synth.Clip:
    # The parent's own domain (unseen seed): a few adaptation steps keep the tiny parent's behaviour, so
    # the gate's proxies pass; domain shift and accuracy are bench/adaptation.py's business.
    return synth.generate_clip("source", frames=10, size=SIZE, seed=7)


def trained_parent(directory: Path) -> Path:
    """A briefly trained mini-os8 parent (a random one is too fragile for the gate's proxies)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_config("mini-os8")
    model = build_model(cfg)
    source = [prepare_clip(c.frames, SIZE, flows=c.flow, labels=c.labels)
              for c in (synth.generate_clip("source", frames=4, size=SIZE, seed=s) for s in range(4))]
    train(model, SourceOnly(head_lr_mult=1.0), PairSampler(source, batch_size=4, seed=0),
          TrainConfig(steps=40, lr=3e-3))
    model.eval()
    meta = make_meta(cfg, list(synth.CLASSES), palette_for(synth.CLASSES), SIZE, parent=None, source="test")
    return save_checkpoint(directory, model, meta)


def clip_video(path: Path, clip: synth.Clip) -> Path:
    with VideoWriter(path, 15.0, SIZE[1], SIZE[0], crf=18) as w:
        for frame in clip.frames:
            w.write(frame)
    return path
