"""UnifiedVideoDA (Kareer et al., TMLR 2024) techniques on a DACS-style EMA-teacher self-training base.

Base ("the strong image baseline"): an EMA teacher predicts the target; half of the classes of the
source label are pasted onto the target (ClassMix); the student learns the mixed image against the
mixed label, weighted by the DACS pseudo-weight (the fraction of confident teacher pixels).
Options, each a technique of the paper:
* ``consistent_mix``: ACCEL on both frames, mixed with ONE class mask (and the flows mixed by it),
  so the pair still matches its flow; without it the mix and the loss are per-frame (image DACS);
* ``refine``: pseudo-label refinement with the teacher's prediction of a neighbouring frame warped to
  k, ``consistency`` / ``max-confidence`` / ``warp-frame`` (``adaptation.losses.refine_pseudo_labels``),
  from the past (``direction="backward"``: frame k-1, warped with the flow k -> k-1) or from the
  future (``"forward"``: frame k+1, warped with the flow k -> k+1; dataset extra ``next``);
* ``video_discriminator``: an LSGAN discriminator on stacked predictions of frames k and k-1
  (weight ``lambda_adv`` = 0.1 x 0.001 as the paper's scripts).
Fixes of the reference: every neighbour prediction is warped BEFORE fusion/refinement (UnifiedVideoDA's
inference path fuses unwarped logits), with a bilinear backward warp and a validity mask instead of
truncated indices; each frame gets its own softmax in the discriminator input.
The teacher's BatchNorm normalises with the target batch's own statistics (``teacher_bn="batch"``):
a teacher on source running statistics gives poor labels on a shifted domain.
Batches: see ``adaptation.methods.davsn``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.classes import IGNORE_INDEX
from models.warp import warp

from ..augment import AugmentConfig, apply_augment, sample_params
from ..discriminators import FCDiscriminator, set_requires_grad
from ..distributed import unwrap_model
from ..ema import ema_update
from ..contract import MethodContext, Needs, UDAMethod, require_classes
from ..losses import REFINEMENTS, refine_pseudo_labels
from ..options import Bool, Choice, Float, Int
from ..supervision import accel_previous, source_terms
from ..trainer import LossOutput
from ..uda_losses import (SOURCE, TARGET, adversarial_lsgan, class_mix_mask, mix, pair_input, pseudo_weight,
                          softmax_up, weighted_ce)
from .supervised import SourceOnly

REFINE = REFINEMENTS
WEIGHT = Float(0.0, 1000.0)


class UnifiedVideoDA(UDAMethod, SourceOnly):
    name = "uvda"
    aux_optimizer_options = {"betas": (0.9, 0.99)}
    # ``augment`` is a constructor argument for code, not an option.
    OPTIONS = {"consistent_mix": Bool(), "refine": Choice(*REFINE), "direction": Choice("backward", "forward"),
               "video_discriminator": Bool(), "threshold": Float(0.0, 1.0), "ema_alpha": Float(0.0, 1.0),
               "lambda_target": WEIGHT, "lambda_adv": WEIGHT, "teacher_bn": Choice("batch", "running"),
               "warmup": Int(0, 10**9), "ndf": Int(1, 1024), "aux_weight": WEIGHT, "head_lr_mult": WEIGHT}

    @classmethod
    def _build(cls, context: MethodContext, options: dict[str, Any]) -> UnifiedVideoDA:
        return cls(num_classes=require_classes(cls.name, context), seed=context.seed, **options)

    def __init__(self, num_classes: int, consistent_mix: bool = False, refine: str | None = None,
                 direction: str = "backward", video_discriminator: bool = False, threshold: float = 0.968,
                 ema_alpha: float = 0.999, lambda_target: float = 1.0, lambda_adv: float = 1e-4,
                 teacher_bn: str = "batch", warmup: int = 0, augment: AugmentConfig | None = None,
                 ndf: int = 64, aux_weight: float = 0.1, head_lr_mult: float = 10.0, seed: int = 0) -> None:
        super().__init__(aux_weight, head_lr_mult)
        if refine is not None and refine not in REFINE:
            raise ValueError(f"unknown refinement {refine!r}; choose one of {', '.join(REFINE)}")
        if direction not in ("backward", "forward"):
            raise ValueError(f"direction must be backward or forward, got {direction!r}")
        if teacher_bn not in ("batch", "running"):
            raise ValueError(f"teacher_bn must be batch or running, got {teacher_bn!r}")
        self.consistent_mix, self.refine, self.direction = consistent_mix, refine, direction
        self.threshold, self.ema_alpha, self.lambda_target = threshold, ema_alpha, lambda_target
        self.lambda_adv, self.teacher_bn, self.warmup = lambda_adv, teacher_bn, warmup
        # DACS: colour jitter (0.2 each) p 0.8 and Gaussian blur p 0.5 on the mixed images.
        self.augment = augment or AugmentConfig(blur_p=0.5, blur_sigma=(0.15, 1.15), jitter_p=0.8, brightness=0.2,
                                                contrast=0.2, saturation=0.2, hue=0.05, gray_p=0.0)
        self.disc = FCDiscriminator(2 * num_classes, ndf) if video_discriminator else None
        self._d = self.disc
        self.teacher: nn.Module | None = None
        self.gen = torch.Generator().manual_seed(seed)
        target = (("prev2",) if video_discriminator else ()) + (("next",) if refine and direction == "forward" else ())
        self.needs = Needs(source=("prev2",) if video_discriminator else (), target=target)

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {}
        if self.disc is not None:
            mods["disc"] = self.disc
        if self.teacher is not None:
            mods["teacher"] = self.teacher
        return mods

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        if self.disc is not None:
            self._d = wrap(self.disc)

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.disc.parameters()), "lr_mult": 1.0}] if self.disc is not None else []

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        self.gen.set_state(state["rng"])
        if model is not None and self.teacher is None:
            self._init_teacher(model)  # its weights are then restored from the saved "teacher" module

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.disc is not None:
            self.disc.train()

    def _init_teacher(self, model: nn.Module) -> None:
        self.teacher = copy.deepcopy(unwrap_model(model)).requires_grad_(False)

    def after_step(self, model: nn.Module, step: int) -> None:
        # DACS: alpha = min(1 - 1 / (step + 1), ema_alpha), so the teacher follows closely at first.
        ema_update(self.teacher, unwrap_model(model), min(1 - 1 / (step + 2), self.ema_alpha))

    # --- teacher -------------------------------------------------------------------------
    def _teacher(self, fn: Callable[[nn.Module], Any]) -> Any:
        assert self.teacher is not None
        self.teacher.train(self.teacher_bn == "batch")
        with torch.no_grad():
            return fn(self.teacher)

    def _target_probs(self, trg: dict[str, Any], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher probabilities of frame k at ``size`` and, with refinement, the refined labels.

        Frame k is predicted by ACCEL (consistent mix) or per frame; the neighbour (k-1 backward, k+1
        forward) per frame, then warped to k bilinearly with the flow k -> neighbour.
        """
        if self.consistent_mix:
            logits = self._teacher(lambda t: t(trg["cur"], trg["prev"], trg["flow"])["fused"])
        else:
            logits = self._teacher(lambda t: t.frame(trg["cur"])["main"])
        probs = softmax_up(logits.float(), size)
        if self.refine is None:
            return probs, None
        frame, flow = (trg["prev"], trg["flow"]) if self.direction == "backward" else (trg["next"], trg["flow_next"])
        other = softmax_up(self._teacher(lambda t: t.frame(frame)["main"]).float(), size)
        prop, valid = warp(other, flow)
        return probs, refine_pseudo_labels(probs, prop, valid, self.refine)

    # --- loss ----------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        if self.teacher is None:
            self._init_teacher(model)
        src, trg = batch["source"], batch["target"]
        size = tuple(trg["cur"].shape[-2:])
        s_out = model(src["cur"], src["prev"], src["flow"])
        loss, logs = source_terms(s_out, src["label"], self.aux_weight)
        probs, refined = self._target_probs(trg, size)
        labels = probs.argmax(1) if refined is None else refined
        weight = pseudo_weight(probs, self.threshold)[:, None, None] * (labels != IGNORE_INDEX).float()
        # ClassMix at the input resolution: half of the source classes pasted onto the target.
        mask = class_mix_mask(src["label"], self.gen)
        mixed_label = mix(mask, src["label"], labels).long()
        mixed_weight = mix(mask, torch.ones_like(weight), weight)
        params = sample_params(trg["cur"].shape[0], self.augment, self.gen)
        cur = apply_augment(mix(mask, src["cur"], trg["cur"]), params)
        if self.consistent_mix:
            # ONE mask for both frames and the flow keeps the pair consistent with its (mixed) flow.
            prev = apply_augment(mix(mask, src["prev"], trg["prev"]), params)
            out = model(cur, prev, mix(mask, src["flow"], trg["flow"]))
            logits, aux = out["fused"], out.get("fused_aux")
        else:
            out = model.frame(cur)
            logits, aux = out["main"], out.get("aux")
        target = weighted_ce(logits, mixed_label, mixed_weight)
        if aux is not None and self.aux_weight > 0:
            target = target + self.aux_weight * weighted_ce(aux, mixed_label, mixed_weight)
        active = 1.0 if step >= self.warmup else 0.0
        loss = loss + active * self.lambda_target * target
        logs.update(mix_ce=float(target.detach()), pseudo_weight=float(weight.mean()))
        aux_loss = None
        if self.disc is not None:
            adv, aux_loss = self._video_adversarial(model, s_out, src, trg)
            loss = loss + self.lambda_adv * adv
            logs.update(adv=float(adv.detach()), d_loss=float(aux_loss.detach()))
        return LossOutput(loss, aux_loss, logs)

    def _video_adversarial(self, model: nn.Module, s_out: dict, src: dict,
                           trg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(src["cur"].shape[-2:])
        t_out = model(trg["cur"], trg["prev"], trg["flow"])
        s_prev = accel_previous(model, s_out, src)["main"]
        t_prev = accel_previous(model, t_out, trg)["main"]
        assert self.disc is not None and self._d is not None
        set_requires_grad([self.disc], False)
        adv = adversarial_lsgan(self._d(pair_input(t_out["fused"], t_prev, size)), SOURCE)
        set_requires_grad([self.disc], True)
        d_loss = 0.5 * adversarial_lsgan(self._d(pair_input(s_out["fused"].detach(), s_prev, size)), SOURCE) + \
            0.5 * adversarial_lsgan(self._d(pair_input(t_out["fused"].detach(), t_prev, size)), TARGET)
        return adv, d_loss
