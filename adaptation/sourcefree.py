"""Offline source-free adaptation driver: parent model + unlabeled target clips -> gated candidate.

Used by ``vss adapt`` and by the adaptation worker (frames from its clip buffer, a ``should_stop``
callback and progress callbacks). Steps: hold out clips for the gate, copy the parent, re-estimate
BatchNorm statistics on the target frames (so teachers see target statistics), build the method,
run the ONE training loop (``adaptation.trainer.train``), then gate the candidate against the parent
on the held-out clips. Nothing is written here: the caller saves ``result.model`` with
``result.meta`` only when ``result.report.passed``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from models.accel import AccelSegmenter
from models.checkpoint import make_meta
from models.config import ModelConfig

from .contract import Method
from .fewlabel import MAX_LABELED_FRAMES, WithLabels, labeled_frames
from .clips import PairSampler, TargetClip, class_balanced_weights, data_sha256, frames_tensor, split_heldout
from .gate import GateReport, GateThresholds, gate
from .methods import build_method
from .methods.bn import recalibrate_bn
from .trainer import Cancelled, NonFiniteLoss, TrainConfig, TrainResult, train

SOURCE_FREE = ("bn", "tent", "itcr", "stpl", "selftrain", "srcstats", "cotta")

# Recommended settings per method, chosen with bench/adaptation.py on the synthetic benchmark:
# the learning rate, the method's options, and ``AdaptConfig`` fields left unset (None) by the caller.
# Self-training anchors to the frozen starting model (the parent after the BN pre-pass): at seed 0 it
# gained 0.5-1.3 mIoU on every style, and on `recolor` its mean change over 16 test clips went from
# -0.5 (below the parent) to +0.3.
DEFAULTS: dict[str, dict[str, Any]] = {
    "bn": {"lr": 0.0, "options": {}, "config": {"batch_size": 2, "crop": None, "flip": True}},
    "tent": {"lr": 1e-3, "options": {}, "config": {"batch_size": 2, "crop": None, "flip": True}},
    "itcr": {"lr": 1e-4, "options": {}, "config": {"batch_size": 2, "crop": None, "flip": True}},
    "stpl": {"lr": 1e-4, "options": {}, "config": {"batch_size": 4, "crop": (128, 256), "flip": True}},
    "selftrain": {"lr": 1e-4, "options": {"anchor_weight": 1.0},
                  "config": {"batch_size": 2, "crop": None, "flip": True}},
    # srcstats: full frames, not flipped (its position prior is not left-right symmetric: flipped frames
    # blurred the confusion estimate, measured on fog), only the classifier heads trained (a relabelling)
    "srcstats": {"lr": 1e-3, "options": {"params": "heads"},
                 "config": {"batch_size": 2, "crop": None, "flip": False}},
    # a baseline (CoTTA-style) for bench/continual.py, not tuned on the benchmark; crops keep its teacher's
    # up-to-6 augmented forwards per step affordable on a CPU
    "cotta": {"lr": 1e-4, "options": {}, "config": {"batch_size": 2, "crop": (128, 256), "flip": True}},
}

ProgressFn = Callable[[str, dict[str, Any]], None]


@dataclass
class AdaptConfig:
    """Everything that defines an adaptation run (recorded in the checkpoint meta)."""

    method: str = "stpl"
    options: dict[str, Any] = field(default_factory=dict)  # method keyword arguments (over DEFAULTS)
    steps: int = 200
    lr: float | None = None  # None: the method's default
    optimizer: str = "adam"
    grad_clip: float | None = 1.0
    time_budget_s: float | None = None  # time for BN pre-pass + training (the gate is extra)
    budget_clock: str = "wall"  # "wall", or "cpu": CPU seconds of this process (load-independent)
    seed: int = 0
    batch_size: int | None = None  # (t-1, t) pairs per step; None: the method's default
    # random (h, w) crops, or "full" frames (resolved to None: no crop); None: the method's default
    crop: tuple[int, int] | Literal["full"] | None = None
    flip: bool | None = None  # random horizontal flips; None: the method's default (all but srcstats)
    sampling: str = "class-balanced"  # or "random"
    heldout_fraction: float = 0.25
    chunk: int = 16  # frames per piece when splitting held-out clips
    bn_prepass: bool = True  # re-estimate BN statistics on target frames before training
    prepass_frames: int = 32  # at most this many frames (evenly spaced) in the pre-pass
    labeled_frames: int = 0  # K <= 4 labeled target frames (from ``adapt(labeled=...)``) as extra supervision
    label_weight: float = 1.0  # weight of their cross-entropy (``adaptation.fewlabel``)

    def resolved(self) -> dict[str, Any]:
        """The configuration with method defaults filled in."""
        if self.method not in SOURCE_FREE:
            raise ValueError(f"unknown source-free method {self.method!r}; choose one of {SOURCE_FREE}")
        if not 0 <= self.labeled_frames <= MAX_LABELED_FRAMES:
            raise ValueError(f"labeled_frames must be between 0 and {MAX_LABELED_FRAMES}, got {self.labeled_frames}")
        if self.labeled_frames and self.method == "bn":
            raise ValueError("labeled frames need a method that trains weights (bn only re-estimates statistics)")
        d = asdict(self)
        d["lr"] = DEFAULTS[self.method]["lr"] if self.lr is None else self.lr
        d["options"] = {**DEFAULTS[self.method]["options"], **self.options}
        for key, value in DEFAULTS[self.method]["config"].items():
            if d[key] is None:
                d[key] = value
        if d["flip"] is None:
            d["flip"] = True  # a method whose defaults do not say: flipped pairs, as before
        if d["crop"] == "full":
            d["crop"] = None  # resolved: None is no crop (whole frames)
        return d


@dataclass
class AdaptResult:
    model: AccelSegmenter  # the candidate (eval mode)
    report: GateReport
    meta: dict[str, Any]  # checkpoint meta for the candidate (includes the gate report)
    train: TrainResult | None
    elapsed_s: float


class Budget:
    """Seconds spent since creation on the wall clock, or as CPU time of this process (all threads).

    The CPU clock makes a budget mean the same work on a loaded shared machine as on an idle one
    (benchmarks). It is conservative: a compute-bound process keeps at least one core busy, so S
    CPU-seconds never take more than S seconds of wall time on an idle machine. The wall clock is
    what a service worker wants.
    """

    def __init__(self, seconds: float | None, clock: str = "wall") -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"budget clock must be wall or cpu, got {clock!r}")
        self.seconds, self.clock = seconds, clock
        self.start = self._now()

    def _now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.monotonic()

    def spent(self) -> float:
        return self._now() - self.start

    def left(self) -> float | None:
        return None if self.seconds is None else max(0.0, self.seconds - self.spent())


def until_spent(batches: Iterator[dict[str, Any]], budget: Budget) -> Iterator[dict[str, Any]]:
    """Yield batches until the budget is spent (the loop then stops with ``stopped_by="data"``)."""
    for batch in batches:
        if budget.left() == 0.0:
            return
        yield batch


def _on_device(batches: Iterator[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _spaced(frames: list[np.ndarray], limit: int) -> list[np.ndarray]:
    if len(frames) <= limit:
        return frames
    idx = np.linspace(0, len(frames) - 1, limit).round().astype(int)
    return [frames[i] for i in idx]


@torch.no_grad()
def _predicted_histograms(model: AccelSegmenter, clips: Sequence[TargetClip], num_classes: int,
                          batch: int = 4) -> np.ndarray:
    """Per (t-1, t) pair: the model's predicted class pixel counts on frame t.

    Computed in eval mode on frames downscaled by 2 (a quarter of the cost; class shares barely move).
    """
    model.eval()
    frames = [clip.frames[t] for clip in clips for t in range(1, len(clip))]
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(frames), batch):
        x = frames_tensor(np.stack(frames[i:i + batch])).to(device)
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        logits = model.frame(x)["main"]
        for lab in logits.argmax(1):
            out.append(torch.bincount(lab.flatten(), minlength=num_classes)[:num_classes].cpu().numpy())
    return np.stack(out)


def adapt(parent: AccelSegmenter, parent_meta: dict[str, Any], clips: Sequence[TargetClip], cfg: AdaptConfig,
          parent_ref: str | None = None, val: Sequence[TargetClip] | None = None,
          heldout: Sequence[TargetClip] | None = None, thresholds: GateThresholds = GateThresholds(),
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          should_stop: Callable[[], bool] | None = None, on_progress: ProgressFn | None = None,
          provenance: dict[str, Any] | None = None, device: str | torch.device | None = None,
          labeled: Sequence[TargetClip] | None = None) -> AdaptResult:
    """Adapt a copy of ``parent`` to ``clips`` and gate it. The parent itself is never modified.

    ``heldout``: gate clips; by default a share of ``clips`` is held out (``split_heldout``). ``val``:
    labeled validation clips (the gate is then decided by mIoU). Raises ``Cancelled`` when
    ``should_stop()`` turns true; a diverging run (non-finite loss) returns a rejected report.
    ``device``: where the candidate trains and is gated (default: the parent's device); the returned
    model stays there. ``labeled``: labeled target clips of which ``cfg.labeled_frames`` frames are
    also trained on (``adaptation.fewlabel``; may be the ``val`` clips).
    """
    t0 = time.monotonic()
    budget = Budget(cfg.time_budget_s, cfg.budget_clock)
    settings = cfg.resolved()
    supervision = labeled_frames(labeled or [], cfg.labeled_frames) if cfg.labeled_frames else None
    progress = on_progress or (lambda stage, info: None)
    train_clips = list(clips)
    if heldout is None:
        train_clips, heldout = split_heldout(clips, cfg.heldout_fraction, cfg.chunk)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device) if device is not None else next(parent.parameters()).device
    candidate = copy.deepcopy(parent).to(dev)
    num_classes = int(candidate.num_classes)
    frames = _spaced([f for c in train_clips for f in c.frames], cfg.prepass_frames)

    if cfg.bn_prepass and cfg.method != "bn":
        progress("bn_prepass", {"frames": len(frames)})
        recalibrate_bn(candidate, (frames_tensor(np.stack(frames[i:i + 4])).to(dev) for i in range(0, len(frames), 4)))
    weights = None
    if cfg.sampling == "class-balanced":
        weights = class_balanced_weights(_predicted_histograms(candidate, train_clips, num_classes))
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled before training")
    method: Method = build_method(cfg.method, seed=cfg.seed, **settings["options"])
    if supervision is not None:
        method = WithLabels(method, *supervision, weight=cfg.label_weight, seed=cfg.seed)
    crop = settings["crop"]
    sampler = PairSampler(train_clips, settings["batch_size"], cfg.sampling, weights,
                          None if crop is None else tuple(crop), settings["flip"], cfg.seed)
    batches: Iterator[dict[str, Any]] = iter(sampler) if dev.type == "cpu" else _on_device(iter(sampler), dev)
    wall_left = None
    if cfg.time_budget_s is not None:
        budget.seconds = max(0.0, cfg.time_budget_s)
        if cfg.budget_clock == "cpu":
            batches = until_spent(batches, budget)
        else:
            wall_left = budget.left()
    tcfg = TrainConfig(steps=cfg.steps, lr=settings["lr"], optimizer=cfg.optimizer, grad_clip=cfg.grad_clip,
                       time_budget_s=wall_left, log_every=10)
    progress("train", {"steps": cfg.steps})
    result: TrainResult | None = None
    failure: str | None = None
    try:
        result = train(candidate, method, batches, tcfg, on_log=on_log, should_stop=should_stop)
    except NonFiniteLoss as e:
        failure = f"training diverged: {e}"
    method.finish(candidate)
    candidate.eval()
    progress("gate", {"heldout_clips": len(heldout)})
    if failure is not None:
        report = GateReport(False, [failure], {"finite": False})
    else:
        reference = parent if next(parent.parameters()).device == dev else copy.deepcopy(parent).to(dev)
        report = gate(reference, candidate, heldout, val, thresholds, classes=parent_meta.get("classes"))
    elapsed = time.monotonic() - t0
    train_info: dict[str, Any] = {"steps": 0, "seconds": None, "stopped_by": "error"}
    if result is not None:
        last = result.history[-1] if result.history else {}
        train_info = {"steps": result.steps, "seconds": round(result.elapsed_s, 2), "stopped_by": result.stopped_by,
                      "final": {k: round(v, 5) for k, v in last.items()}}
    meta = make_meta(ModelConfig.from_dict(parent_meta["architecture"]), parent_meta["classes"],
                     parent_meta["palette"], tuple(parent_meta["input_size"]), parent=parent_ref,
                     source="adaptation.sourcefree", method=cfg.method, hyperparameters=settings,
                     data_sha256=data_sha256(list(train_clips) + list(heldout)),
                     data={"train_frames": sum(len(c) for c in train_clips),
                           "heldout_frames": sum(len(c) for c in heldout),
                           "val_frames": sum(len(c) for c in val) if val else 0},
                     train=train_info, gate=report.to_dict(), **(provenance or {}))
    progress("done", {"passed": report.passed, "seconds": round(elapsed, 2)})
    return AdaptResult(candidate, report, meta, result, elapsed)
