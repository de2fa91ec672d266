"""`vss train`: offline (UDA or supervised) training around THE loop, ``adaptation.trainer.train``.

This driver only assembles: datasets from specs, the model (``--init`` checkpoint or random), the
method, optimisers, DDP under torchrun; the loop runs the steps and calls back ``on_log`` after each
one, where this driver logs (JSONL + tqdm on a TTY), evaluates on the target validation split, and
writes checkpoints (rank 0 only). Run directory:

    RUN_DIR/config.json                   the run's arguments (a resume must match them)
    RUN_DIR/log.jsonl                     one JSON object per logged step or evaluation
    RUN_DIR/state.json                    pointer to the last checkpoint, best metrics (atomic)
    RUN_DIR/checkpoints/step_NNNNNNN/     registry-ready checkpoints (the last ``keep``)
    RUN_DIR/checkpoints/step_NNNNNNN.state.pt   optimiser + method state for resuming
    RUN_DIR/best/                         the best checkpoint by target-val mIoU (``vss models import``)

A run resumes from its last checkpoint (weights, optimisers, method modules and RNG, data position).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.accel import build_model
from models.atomic import replacing, write_atomic
from models.checkpoint import load_checkpoint, make_meta, save_checkpoint
from models.classes import palette_for
from models.config import ModelConfig, get_config
from models.source_stats import SourceStats

from .datasets import VideoFrameDataset, accepted_options, build_dataset, classes_of, label_space_of, parse_spec
from .distributed import BatchIndices, DistEnv, barrier, distribute, init_distributed, shutdown, unwrap_model
from .evaluate import build_eval_dataset, evaluate
from .contract import Method, from_text
from .methods import build_method, method_class
from .source_stats import compute_source_stats
from .trainer import TrainConfig, make_optimizer, train

# Arguments that must match when a run directory is resumed.
RUN_IDENTITY = ("method", "source", "target", "config", "input_size", "method_args")


@dataclass
class OfflineConfig:
    method: str
    source: str
    target: str | None
    run_dir: Path
    flow: str | None = None  # precomputed | dis | gt | none; None = gt for synthetic, precomputed otherwise
    source_flow_dir: str | None = None
    target_flow_dir: str | None = None
    iters: int = 1000
    batch: int = 1
    lr: float = 2.5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    grad_clip: float | None = 10.0
    aux_lr: float = 1e-4  # discriminators (Adam), as DA-VSN / I2VDA
    amp: bool = False
    config: str = "mini-os8"
    input_size: tuple[int, int] = (256, 512)
    source_size: tuple[int, int] | None = None
    init: str | None = None
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only
    ckpt_every: int = 0  # 0: with every evaluation (or at the end)
    eval_items: int | None = None
    keep: int = 2
    workers: int = 0
    device: str | None = None
    log_every: int = 10
    progress: bool | None = None  # None: a bar when stderr is a TTY
    method_args: dict[str, Any] = field(default_factory=dict)
    dataset_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"clips": 8} for synthetic data
    stats_frames: int = 16  # source frames whose statistics every checkpoint stores (models.source_stats); 0: none

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in RUN_IDENTITY}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_stream(source: VideoFrameDataset, target: VideoFrameDataset | None, cfg: OfflineConfig, env: DistEnv,
                 start_step: int) -> Iterator[dict[str, Any]]:
    """UDA batches ``{"source": ..., "target": ...}`` (or flat source batches when ``target`` is None)."""
    def loader(ds: VideoFrameDataset, salt: int) -> DataLoader:
        return DataLoader(ds, batch_sampler=BatchIndices(len(ds), cfg.batch, cfg.seed + salt, env, start_step),
                          num_workers=cfg.workers, pin_memory=env.device.type == "cuda")
    src = loader(source, 0)
    if target is None:
        for s in src:
            yield to_device(s, env.device)
    else:
        for s, t in zip(src, loader(target, 1)):
            yield {"source": to_device(s, env.device), "target": to_device(t, env.device)}


class OfflineRun:
    """One ``vss train`` run; ``run()`` returns a summary dict (rank 0 writes everything)."""

    def __init__(self, cfg: OfflineConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.env = init_distributed(cfg.device)
        self.best: dict[str, Any] = {"miou": None, "step": None}
        self.last_step = 0
        self._t0 = time.monotonic()
        self._bar = None
        self._stats: tuple[int, SourceStats | None] | None = None  # (step, statistics of the model at that step)

    # --- setup ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any] | None:
        path = self.run_dir / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _check_identity(self) -> None:
        path = self.run_dir / "config.json"
        want = self.cfg.identity()
        if path.is_file():
            have = {k: json.loads(path.read_text()).get(k) for k in RUN_IDENTITY}
            diff = [k for k in RUN_IDENTITY if have[k] != want[k]]
            if diff:
                raise ValueError(f"{self.run_dir} holds another run ({', '.join(f'{k}: {have[k]!r}' for k in diff)}); "
                                 "use the same arguments to resume it, or a new -o directory")

    def _write_config(self) -> None:
        """Record the run's arguments once everything was built (a failed start leaves no run behind)."""
        path = self.run_dir / "config.json"
        if self.env.is_main and not path.is_file():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**asdict(self.cfg), "run_dir": str(self.run_dir)}, indent=2,
                                          default=str).encode())

    def _model(self, classes: tuple[str, ...], resume: dict[str, Any] | None) -> tuple[torch.nn.Module, dict]:
        cfg = self.cfg
        if resume is not None:
            model, meta = load_checkpoint(self.run_dir / resume["last"])
        elif cfg.init is not None:
            model, meta = load_checkpoint(cfg.init)
            meta = {**meta, "parent": Path(cfg.init).resolve().name}  # e.g. "demo_model" or a registry "v0003"
        else:
            arch = get_config(cfg.config, num_classes=len(classes))
            model = build_model(arch)
            meta = {"architecture": arch.to_dict(), "classes": list(classes), "palette": palette_for(classes),
                    "parent": None}
        if list(meta["classes"]) != list(classes):
            raise ValueError(f"the model predicts {list(meta['classes'])} but {cfg.source} is labelled with "
                             f"{list(classes)}")
        return model, meta

    def _datasets(self, method: Method, classes: tuple[str, ...]) -> tuple:
        cfg = self.cfg
        needs = method.needs
        src_spec = parse_spec(cfg.source)
        trg_spec = parse_spec(cfg.target) if cfg.target else None
        src_size = cfg.source_size or cfg.input_size
        space = label_space_of(classes)
        used = [src_spec] + ([trg_spec] if trg_spec else [])
        unused = set(cfg.dataset_args) - {k for sp in used for k in accepted_options(sp, cfg.dataset_args)}
        if unused:
            raise ValueError(f"dataset option(s) {sorted(unused)} apply to none of {', '.join(map(str, used))}")

        def options(spec: Any) -> dict[str, Any]:
            return {"flow": cfg.flow, **accepted_options(spec, cfg.dataset_args)}

        if needs is not None and trg_spec is None:
            raise ValueError(f"--method {cfg.method} adapts to a target domain: give --target SPEC")
        source = build_dataset(src_spec, "train", src_size, extras=needs.source if needs else (),
                               flow_dir=cfg.source_flow_dir, **options(src_spec))
        target = None
        if needs is not None:
            target = build_dataset(trg_spec, "train", cfg.input_size, extras=needs.target, labels=False,
                                   label_space=space, flow_dir=cfg.target_flow_dir, **options(trg_spec))
        val_spec = trg_spec or src_spec
        val = build_eval_dataset(val_spec, "val", cfg.input_size, label_space=space,
                                 flow_dir=cfg.target_flow_dir if trg_spec else cfg.source_flow_dir, **options(val_spec))
        return source, target, val

    # --- checkpoints -----------------------------------------------------------------------
    def _meta(self, step: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
        cfg, base = self.cfg, self.base_meta
        return make_meta(ModelConfig.from_dict(base["architecture"]), base["classes"], base["palette"],
                         cfg.input_size, parent=base.get("parent"), method=cfg.method, source=cfg.source,
                         target=cfg.target, step=step, seed=cfg.seed, metrics=metrics, run_dir=str(self.run_dir))

    def _source_stats(self, step: int) -> SourceStats | None:
        """Statistics of the model at ``step`` on ``stats_frames`` evenly spaced labeled source items."""
        if self.cfg.stats_frames <= 0:
            return None
        if self._stats is None or self._stats[0] != step:
            n = min(self.cfg.stats_frames, len(self.source))
            items = [self.source[int(i)] for i in np.linspace(0, len(self.source) - 1, n).round()]
            frames = [it["cur"].permute(1, 2, 0).clamp(0, 255).round().byte().numpy() for it in items]
            labels = [it["label"].numpy() for it in items]
            stats = compute_source_stats(unwrap_model(self.model), frames, labels,
                                         provenance={"source": "vss train", "data": self.cfg.source, "step": str(step)})
            self._stats = (step, stats)
        return self._stats[1]

    def _save(self, step: int, metrics: dict[str, Any] | None) -> None:
        plain = unwrap_model(self.model)
        plain.source_stats = self._source_stats(step)
        ckpts = self.run_dir / "checkpoints"
        name = f"step_{step:07d}"
        if not (ckpts / name).exists():
            save_checkpoint(ckpts / name, plain, self._meta(step, metrics))
        state = {"step": step, "optimizer": self.opt.state_dict(),
                 "aux_optimizer": self.aux_opt.state_dict() if self.aux_opt is not None else None,
                 "method": self.method.state_dict(),
                 "modules": {k: m.state_dict() for k, m in self.method.modules().items()}}
        with replacing(ckpts / f"{name}.state.pt") as tmp:
            torch.save(state, tmp)
        write_atomic(self.run_dir / "state.json",
                     json.dumps({"last": f"checkpoints/{name}", "step": step, "best": self.best}, indent=2).encode())
        for old in sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-max(1, self.cfg.keep)]:
            shutil.rmtree(old, ignore_errors=True)
            (ckpts / f"{old.name}.state.pt").unlink(missing_ok=True)

    def _save_best(self, step: int, metrics: dict[str, Any]) -> None:
        """Replace RUN_DIR/best: write a new directory, then two renames (old aside, new in place)."""
        new, old, best = self.run_dir / ".best.new", self.run_dir / ".best.old", self.run_dir / "best"
        shutil.rmtree(new, ignore_errors=True)
        plain = unwrap_model(self.model)
        plain.source_stats = self._source_stats(step)
        save_checkpoint(new, plain, self._meta(step, metrics))
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(new, best)
        shutil.rmtree(old, ignore_errors=True)

    # --- loop callbacks ---------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _on_log(self, step: int, logs: dict[str, float]) -> None:
        cfg, main = self.cfg, self.env.is_main
        self.last_step = step
        if main and self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)
        if main and (step % cfg.log_every == 0 or step == cfg.iters):
            lr = self.opt.param_groups[0]["lr"]
            self._log({**logs, "step": step, "time_s": round(time.monotonic() - self._t0, 2), "lr": lr})
        evaluate_now = step == cfg.iters or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
        ckpt_every = cfg.ckpt_every or cfg.eval_every or cfg.iters
        if not (evaluate_now or step % ckpt_every == 0):
            return
        if main:
            metrics = self._evaluate(step) if evaluate_now else None
            self._save(step, metrics)
        barrier(self.env)
        self.method.train_mode(self.model)

    def _evaluate(self, step: int) -> dict[str, Any]:
        result = evaluate(self.model, self.val, self.env.device, max_items=self.cfg.eval_items)
        metrics = {"miou": result["miou"], "tc": result["tc"]}
        self._log({"step": step, "eval": result})
        if result["miou"] is not None and (self.best["miou"] is None or result["miou"] > self.best["miou"]):
            self.best = {"miou": result["miou"], "tc": result["tc"], "step": step}
            self._save_best(step, metrics)
        if self._bar is not None:
            self._bar.write(f"step {step}: target val mIoU {result['miou']} TC {result['tc']}")
        return metrics

    # --- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._check_identity()
        torch.manual_seed(cfg.seed)  # random init of the model and the method's modules (same on every rank)
        resume = self._state()
        classes = classes_of(parse_spec(cfg.source))
        self.model, self.base_meta = self._model(classes, resume)
        start = int(resume["step"]) if resume else 0
        if resume:
            self.best = resume.get("best", self.best)
        options = from_text(method_class(cfg.method).OPTIONS, cfg.method_args)  # `vss train --method-arg K=V`
        self.method = build_method(cfg.method, seed=cfg.seed + env.rank, num_classes=len(classes),
                                   aux_head=bool(self.base_meta["architecture"].get("aux_head", True)),
                                   total_steps=cfg.iters, **options)
        self.source, self.target, self.val = self._datasets(self.method, classes)
        self.model.to(env.device)
        for m in self.method.modules().values():
            m.to(env.device)
        self.method.setup(self.model)
        self.opt = make_optimizer(cfg.optimizer, self.method.param_groups(self.model), cfg.lr, cfg.momentum,
                                  cfg.weight_decay)
        aux_groups = self.method.aux_param_groups()
        self.aux_opt = None
        if any(g["params"] for g in aux_groups):
            self.aux_opt = make_optimizer("adam", aux_groups, cfg.aux_lr, cfg.momentum, 0.0)
            for g in self.aux_opt.param_groups:
                g.update(self.method.aux_optimizer_options)
        if resume:
            self._restore(resume)
        self._write_config()
        distribute(self.model, self.method, env)
        tcfg = TrainConfig(steps=cfg.iters, lr=cfg.lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, aux_lr=cfg.aux_lr, poly_power=cfg.poly_power,
                           grad_clip=cfg.grad_clip, amp=cfg.amp, log_every=1)
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        if env.is_main and show:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.iters, initial=start, desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        result = None
        try:
            if start < cfg.iters:
                result = train(self.model, self.method, batch_stream(self.source, self.target, cfg, env, start), tcfg,
                               on_log=self._on_log, start_step=start, optimizers=(self.opt, self.aux_opt))
        except KeyboardInterrupt:
            if env.is_main and not env.enabled and self.last_step > start:
                self._save(self.last_step, None)  # resume from here with the same command
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
        if env.is_main and not (self.run_dir / "best").exists():
            self._save_best(self.last_step or start, None)
        summary = {"run_dir": str(self.run_dir), "method": cfg.method, "steps": cfg.iters,
                   "world_size": env.world_size, "resumed_from": start, "best": self.best,
                   "stopped_by": result.stopped_by if result else "complete",
                   "elapsed_s": round(time.monotonic() - self._t0, 1)}
        if env.is_main:
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        barrier(env)
        return summary

    def _restore(self, resume: dict[str, Any]) -> None:
        name = Path(resume["last"]).name
        state = torch.load(self.run_dir / "checkpoints" / f"{name}.state.pt", map_location=self.env.device,
                           weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        if self.aux_opt is not None and state.get("aux_optimizer") is not None:
            self.aux_opt.load_state_dict(state["aux_optimizer"])
        self.method.load_state_dict(state["method"], self.model)
        modules = self.method.modules()
        for key, sd in state.get("modules", {}).items():
            if key not in modules:
                raise ValueError(f"{name}.state.pt has method module {key!r} that {self.cfg.method} does not")
            modules[key].load_state_dict(sd)
            modules[key].to(self.env.device)


def run_offline(cfg: OfflineConfig) -> dict[str, Any] | None:
    """Train as configured, then leave the process group. Returns the summary on rank 0, None elsewhere."""
    run = OfflineRun(cfg)
    try:
        summary = run.run()
    finally:
        shutdown(run.env)
    return summary if run.env.is_main else None

