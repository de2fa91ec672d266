"""I2VDA (Wu et al., ECCV 2022): image-to-video UDA, from the paper (its code is not public).

Source = single labelled IMAGES (frame k only). Target = two consecutive frames I_0 = k-1 and I_1 = k.
Every prediction here is the ACCEL model's image ("keyframe") output, the frame fused with itself,
so the per-frame network and the fusion layer stay consistent. Per step:
* temporal augmentation: a frame I_t, t ~ U(0, 1) per sample, interpolated from I_0 and I_1 with the
  bidirectional flow (eq. 1-3, alpha = 0.5);
* adversarial LSGAN on the per-frame predictions P^s (source), P_0 and P_t (target): the segmenter
  is weighted 0.01 (eq. 11), the discriminator uses eq. 12;
* temporal-augmented consistency (eq. 4-9): P_t warped to moment 1 is trained with CE against the
  proxy network's pseudo-label of I_1, kept where its entropy < delta and it is not occluded (eta = 1);
* the proxy network M' is a frozen copy of the model in eval mode, re-copied every ``iter_copy``
  steps; the consistency loss starts after ``iter_launch`` steps (Algorithm 1).

Choices where the paper is silent or inconsistent: delta = 0.3 (the best value of its Table 5; the
text says 0.8); F_1->t is approximated as (1 - t) F_1->0 (the paper runs FlowNet2 on (I_1, I_t), which
we do not ship); the occlusion check is done on I_1's grid (see ``uda_losses.occlusion_mask``);
iter_copy / iter_launch default to 16 % of the run (8k of 50k in the paper); I_t passes through BN
without entering its running statistics. The source term keeps DeepLabV2's 0.1 x aux-head CE.
Batches: see ``adaptation.methods.davsn``; the target needs extra ``flow_fwd`` (flow k-1 -> k).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.classes import IGNORE_INDEX
from models.warp import warp

from ..discriminators import FCDiscriminator, set_requires_grad
from ..distributed import unwrap_model
from ..contract import MethodContext, Needs, UDAMethod, require_classes
from ..losses import cross_entropy_ignore
from ..options import Float, Int
from ..supervision import segmentation_ce
from ..trainer import LossOutput
from ..uda_losses import (SOURCE, TARGET, adversarial_lsgan, entropy_pseudo_labels, interpolate_frame,
                          occlusion_mask, scale_flow, softmax_up)
from .supervised import SourceOnly

WEIGHT = Float(0.0, 1000.0)


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm still normalises with the batch's statistics but does not fold them into its running ones.

    The interpolated frame I_t is an augmentation: blending two warped frames averages their noise and
    blurs them, so its statistics are not the target's. Letting it into the running statistics cost
    9 mIoU on the noise-blur style and 6 on night in a 40 CPU-s run (bench/uda.py).
    """
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def keyframe(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Main logits of the ACCEL model on a single image: the frame fused with itself (no flow)."""
    main = model.frame(x)["main"]
    return model.fuse(main, main, None)[0]


class I2VDA(UDAMethod, SourceOnly):
    name = "i2vda"
    needs = Needs(source=(), target=("flow_fwd",))
    aux_optimizer_options = {"betas": (0.9, 0.99)}
    OPTIONS = {"lambda_adv": WEIGHT, "lambda_tc": WEIGHT, "alpha": Float(0.0, 1.0), "eta": WEIGHT,
               "delta": Float(0.0, 10.0), "iter_copy": Int(1, 10**9), "iter_launch": Int(0, 10**9),
               "ndf": Int(1, 1024), "aux_weight": WEIGHT, "head_lr_mult": WEIGHT}

    @classmethod
    def _build(cls, context: MethodContext, options: dict[str, Any]) -> I2VDA:
        return cls(num_classes=require_classes(cls.name, context), total_steps=context.total_steps,
                   seed=context.seed, **options)

    def __init__(self, num_classes: int, lambda_adv: float = 0.01, lambda_tc: float = 1.0, alpha: float = 0.5,
                 eta: float = 1.0, delta: float = 0.3, iter_copy: int | None = None, iter_launch: int | None = None,
                 total_steps: int = 50_000, ndf: int = 64, aux_weight: float = 0.1, head_lr_mult: float = 10.0,
                 seed: int = 0) -> None:
        super().__init__(aux_weight, head_lr_mult)
        self.lambda_adv, self.lambda_tc, self.alpha, self.eta, self.delta = lambda_adv, lambda_tc, alpha, eta, delta
        self.iter_copy = iter_copy if iter_copy is not None else max(1, round(0.16 * total_steps))
        self.iter_launch = iter_launch if iter_launch is not None else max(1, round(0.16 * total_steps))
        self.disc = FCDiscriminator(num_classes, ndf)
        self._d: nn.Module = self.disc
        self.proxy: nn.Module | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"disc": self.disc}
        if self.proxy is not None:
            mods["proxy"] = self.proxy
        return mods

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self._d = wrap(self.disc)

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.disc.parameters()), "lr_mult": 1.0}]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state(), "has_proxy": self.proxy is not None}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        self.gen.set_state(state["rng"])
        if state.get("has_proxy") and self.proxy is None and model is not None:
            self._copy_proxy(model)  # its weights are then restored from the saved "proxy" module

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        self.disc.train()

    def _copy_proxy(self, model: nn.Module) -> None:
        """M' <- M (a frozen copy used in eval mode)."""
        if self.proxy is None:
            self.proxy = copy.deepcopy(unwrap_model(model))
        else:
            self.proxy.load_state_dict(unwrap_model(model).state_dict())
        self.proxy.eval().requires_grad_(False)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        src, trg = batch["source"], batch["target"]
        size = tuple(src["cur"].shape[-2:])
        if step % self.iter_copy == 0 or (self.proxy is None and step >= self.iter_launch):
            self._copy_proxy(model)
        # Source IMAGES: no temporal information. The ACCEL model sees an image as a keyframe, the image
        # fused with itself (no flow), so the supervision reaches the fusion layer too; training the
        # per-frame logits alone left the fusion inconsistent with them (-8 mIoU on noise-blur).
        s_out = model.frame(src["cur"])
        s_main = model.fuse(s_out["main"], s_out["main"], None)[0]
        loss = segmentation_ce(s_main, src["label"])
        logs = {"ce": float(loss.detach())}
        if "aux" in s_out and self.aux_weight > 0:
            loss = loss + self.aux_weight * segmentation_ce(model.fuse(s_out["aux"], s_out["aux"], None)[0],
                                                            src["label"])
        # Temporal augmentation: I_t between I_0 = k-1 and I_1 = k.
        i0, i1, f10, f01 = trg["prev"], trg["cur"], trg["flow"], trg["flow_fwd"]
        t = torch.rand(i0.shape[0], generator=self.gen).to(i0.device)
        with torch.no_grad():
            it = interpolate_frame(i0, i1, f10, f01, t, self.alpha)
        p0 = keyframe(model, i0)
        with bn_stats_frozen(model):
            pt = keyframe(model, it)
        # Adversarial (LSGAN) on per-frame softmax maps; the discriminator is frozen for this term.
        set_requires_grad([self.disc], False)
        adv = adversarial_lsgan(self._d(softmax_up(p0, size)), SOURCE) + \
            adversarial_lsgan(self._d(softmax_up(pt, size)), SOURCE)
        set_requires_grad([self.disc], True)
        loss = loss + self.lambda_adv * adv
        logs["adv"] = float(adv.detach())
        if step >= self.iter_launch and self.proxy is not None:
            with torch.no_grad():
                p1 = keyframe(self.proxy, i1)
                probs1 = softmax_up(p1, size)
                pl = entropy_pseudo_labels(probs1, self.delta, occlusion_mask(f10, f01, self.eta))
            # P_1^W = W(P_t, F_1->t) with F_1->t ~ (1 - t) F_1->0 (linear motion between the frames).
            pt_up = F.interpolate(pt, size=size, mode="bilinear", align_corners=True)
            p1w, valid = warp(pt_up, scale_flow(f10, 1.0 - t))
            pl = pl.masked_fill(valid[:, 0] <= 0, IGNORE_INDEX)
            tc = cross_entropy_ignore(p1w, pl)
            loss = loss + self.lambda_tc * tc
            logs["tc"] = float(tc.detach())
            logs["pl_kept"] = float((pl != IGNORE_INDEX).float().mean())
        d_loss = adversarial_lsgan(self._d(softmax_up(s_main.detach(), size)), SOURCE) + \
            0.5 * adversarial_lsgan(self._d(softmax_up(p0.detach(), size)), TARGET) + \
            0.5 * adversarial_lsgan(self._d(softmax_up(pt.detach(), size)), TARGET)
        logs["d_loss"] = float(d_loss.detach())
        return LossOutput(loss, d_loss, logs)
