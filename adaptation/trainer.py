"""THE training loop, shared by offline UDA (`vss train`), offline source-free (`vss adapt`) and the worker.

A method only declares what it trains and computes losses (``adaptation.contract.Method``); this loop owns
zero_grad, backward, gradient clipping, mixed precision, optimiser steps, LR schedule, time
budget, cancellation and non-finite detection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .contract import Method


@dataclass
class LossOutput:
    """What a method returns for one batch.

    ``loss`` trains the segmentation model; ``aux_loss`` (optional) trains the method's own modules
    (e.g. discriminators) and must be computed on detached model outputs.
    """

    loss: torch.Tensor
    aux_loss: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    """A loss or gradient became NaN/inf: the run is aborted, no weights are kept."""


class Cancelled(RuntimeError):
    """The caller asked the loop to stop."""


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 0.0
    aux_lr: float | None = None  # LR of the method's own modules (defaults to lr)
    aux_optimizer: str = "adam"
    poly_power: float = 0.0  # 0 = constant LR; 0.9 = DeepLab poly decay
    grad_clip: float | None = 10.0
    amp: bool = False  # autocast on CUDA (bf16 where supported, else fp16 with a grad scaler)
    time_budget_s: float | None = None  # stop early once this much wall time is spent
    log_every: int = 10


@dataclass
class TrainResult:
    steps: int
    elapsed_s: float
    history: list[dict[str, float]]
    stopped_by: str  # "steps" | "time" | "data"


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """Optimiser over groups carrying ``lr_mult``; each group's base LR is remembered for scheduling."""
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = lr * g.get("lr_mult", 1.0)
        g["lr"] = g["base_lr"]
    if not groups:
        raise ValueError("the method declares no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


def _set_poly_lr(opt: torch.optim.Optimizer, step: int, total: int, power: float) -> None:
    factor = (1 - step / max(total, 1)) ** power if power > 0 else 1.0
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def _all_params(opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]] if opt is not None else []


def train(model: nn.Module, method: Method, batches: Iterable[dict[str, Any]], cfg: TrainConfig,
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          should_stop: Callable[[], bool] | None = None, start_step: int = 0,
          optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer | None] | None = None) -> TrainResult:
    """Run ``cfg.steps`` optimisation steps of ``method`` on ``model`` over ``batches``.

    Raises ``NonFiniteLoss`` on a NaN/inf loss and ``Cancelled`` when ``should_stop()`` turns true.
    Without ``optimizers`` the loop calls ``method.setup(model)`` and builds them from the method's
    groups; a caller that passes ``optimizers`` (to resume: their state restored) has done both.
    """
    if optimizers is None:
        method.setup(model)
        opt = make_optimizer(cfg.optimizer, method.param_groups(model), cfg.lr, cfg.momentum, cfg.weight_decay)
        aux_groups = method.aux_param_groups()
        aux_opt = (make_optimizer(cfg.aux_optimizer, aux_groups, cfg.aux_lr or cfg.lr, cfg.momentum, 0.0)
                   if any(g["params"] for g in aux_groups) else None)
    else:
        opt, aux_opt = optimizers
    device_type = next(model.parameters()).device.type
    use_amp = cfg.amp and device_type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    method.train_mode(model)
    history: list[dict[str, float]] = []
    t0 = time.monotonic()
    step, stopped_by = start_step, "steps"
    it: Iterator[dict[str, Any]] = iter(batches)
    while step < cfg.steps:
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at step {step}")
        if cfg.time_budget_s is not None and time.monotonic() - t0 >= cfg.time_budget_s:
            stopped_by = "time"
            break
        try:
            batch = next(it)
        except StopIteration:
            stopped_by = "data"
            break
        _set_poly_lr(opt, step, cfg.steps, cfg.poly_power)
        opt.zero_grad(set_to_none=True)
        if aux_opt is not None:
            aux_opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=use_amp):
            out = method.loss(model, batch, step)
        if not torch.isfinite(out.loss.detach()):
            raise NonFiniteLoss(f"non-finite loss at step {step}: {out.loss.item()}")
        scaler.scale(out.loss).backward()
        if out.aux_loss is not None and aux_opt is not None:
            aux_opt.zero_grad(set_to_none=True)  # drop what the model loss pushed into the aux modules
            scaler.scale(out.aux_loss).backward()
        for o in (opt, aux_opt):
            if o is None:
                continue
            scaler.unscale_(o)
            params = _all_params(o)
            if cfg.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if not math.isfinite(float(norm)) and not scaler.is_enabled():
                    raise NonFiniteLoss(f"non-finite gradient norm at step {step}")
            scaler.step(o)
        scaler.update()
        method.after_step(model, step)
        step += 1
        logs = {"step": float(step), "loss": float(out.loss.detach()), **out.logs}
        if out.aux_loss is not None:
            logs["aux_loss"] = float(out.aux_loss.detach())
        history.append(logs)
        if on_log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            on_log(step, logs)
    return TrainResult(step - start_step, time.monotonic() - t0, history, stopped_by)
