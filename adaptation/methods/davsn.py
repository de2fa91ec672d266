"""DA-VSN (Guan et al., ICCV 2021): source supervision + cross-domain and intra-domain temporal
consistency regularisation, as a loss module on the shared loop.

UDA batches (all methods in this package that use target videos):
    {"source": {cur, prev, flow, label, prev2?, flow_prev?, ...},
     "target": {cur, prev, flow, prev2?, flow_prev?, next?, flow_next?, flow_fwd?}}
with the keys of ``adaptation.datasets.base``; target labels are never given to a method.

* C-TCR: a spatial discriminator D_s on the current prediction and a spatio-temporal one D_st on
  the stacked predictions of frames k and k-1, adversarial BCE (source = 0, target = 1), and the
  weight-discrepancy loss that decorrelates D_st from D_s; a main and an aux pair as the reference.
* I-TCR: the prediction of frame k-1, warped to k, supervises frame k where it is more confident.

Where the reference code departs from the paper we follow the paper, and say so:
* p_{k-1} is the ACCEL prediction of frame k-1 from (k-1, k-2) (paper §3.2-3.3), not raw t-1 logits;
  D_s sees [p_k, p_k] (same channel count as D_st, so the weight discrepancy is defined) and every
  frame gets its own softmax (the code takes one joint softmax over 2C channels);
* the propagation is a bilinear BACKWARD warp with a validity mask (``models.warp``), not DA-VSN's
  nearest forward splat (which also went through a no-op and a sign flip in its history).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..contract import MethodContext, Needs, UDAMethod, require_classes
from ..discriminators import FCDiscriminator, set_requires_grad
from ..losses import itcr_loss, propagate
from ..options import Bool, Float, Int
from ..supervision import accel_previous, fused_key, source_terms
from ..trainer import LossOutput
from ..uda_losses import SOURCE, TARGET, adversarial_bce, pair_input, weight_discrepancy
from .supervised import SourceOnly

WEIGHT = Float(0.0, 1000.0)


class DAVSN(UDAMethod, SourceOnly):
    name = "davsn"
    needs = Needs(source=("prev2",), target=("prev2",))
    aux_optimizer_options = {"betas": (0.9, 0.99)}  # Adam for the discriminators, as DA-VSN
    OPTIONS = {"ctcr": Bool(), "itcr": Bool(), "lambda_u": WEIGHT, "lambda_sa": WEIGHT, "lambda_wd": WEIGHT,
               "lambda_itcr": WEIGHT, "aux_adv_weight": WEIGHT, "ndf": Int(1, 1024), "aux_weight": WEIGHT,
               "head_lr_mult": WEIGHT}

    @classmethod
    def _build(cls, context: MethodContext, options: dict[str, Any]) -> DAVSN:
        return cls(num_classes=require_classes(cls.name, context), aux_head=context.aux_head, **options)

    def __init__(self, num_classes: int, ctcr: bool = True, itcr: bool = True, lambda_u: float = 1e-3,
                 lambda_sa: float = 1.0, lambda_wd: float = 1.0, lambda_itcr: float | None = None,
                 aux_adv_weight: float = 0.2, aux_head: bool = True, ndf: int = 64, aux_weight: float = 0.1,
                 head_lr_mult: float = 10.0) -> None:
        super().__init__(aux_weight, head_lr_mult)
        if not (ctcr or itcr):
            raise ValueError("DA-VSN without C-TCR and I-TCR is source-only training; use --method source-only")
        self.ctcr, self.itcr = ctcr, itcr
        self.lambda_u, self.lambda_sa, self.lambda_wd = lambda_u, lambda_sa, lambda_wd
        self.lambda_itcr = lambda_u if lambda_itcr is None else lambda_itcr
        self.heads = {"main": 1.0}
        if aux_head and aux_adv_weight > 0:
            self.heads["aux"] = aux_adv_weight
        self.disc = nn.ModuleDict()
        if ctcr:
            for head in self.heads:
                self.disc[f"st_{head}"] = FCDiscriminator(2 * num_classes, ndf)
                self.disc[f"s_{head}"] = FCDiscriminator(2 * num_classes, ndf)
        self._d: dict[str, nn.Module] = dict(self.disc.items())  # what is called: DDP wrappers under torchrun

    def modules(self) -> dict[str, nn.Module]:
        """The method's own trainable modules (saved with checkpoints, wrapped for DDP, moved to device)."""
        return {"disc": self.disc}

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the discriminators' forwards through ``wrap`` (DistributedDataParallel) for gradient averaging."""
        self._d = {k: wrap(m) for k, m in self.disc.items()}

    def aux_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.disc.parameters()), "lr_mult": 1.0}] if self.ctcr else []

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        self.disc.train()

    # --- the loss -------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        src, trg = batch["source"], batch["target"]
        s_out = model(src["cur"], src["prev"], src["flow"])
        loss, logs = source_terms(s_out, src["label"], self.aux_weight)
        t_out = model(trg["cur"], trg["prev"], trg["flow"])
        t_prev = accel_previous(model, t_out, trg)
        aux_loss = None
        if self.ctcr:
            s_prev = accel_previous(model, s_out, src)
            adv, aux_loss, d_logs = self._ctcr(s_out, s_prev, t_out, t_prev, tuple(src["cur"].shape[-2:]))
            loss = loss + self.lambda_u * adv
            logs.update(d_logs)
        if self.itcr:
            itcr = sum(itcr_loss(t_out[fused_key(h)], *propagate(t_prev[h], trg["flow"]))
                       for h in self.heads if h in t_prev)  # the aux term is not down-weighted (reference)
            loss = loss + self.lambda_itcr * itcr
            logs["itcr"] = float(itcr.detach())
        return LossOutput(loss, aux_loss, logs)

    def _ctcr(self, s_out: dict, s_prev: dict, t_out: dict, t_prev: dict,
              size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(generator adversarial term, discriminator loss, logs) of C-TCR."""
        discs = list(self.disc.values())
        set_requires_grad(discs, False)  # the generator's term must not train the discriminators
        adv = torch.zeros((), device=t_out["fused"].device)
        for head, w in self.heads.items():
            cur = t_out[fused_key(head)]
            l_st = adversarial_bce(self._d[f"st_{head}"](pair_input(cur, t_prev[head], size)), SOURCE)
            l_s = adversarial_bce(self._d[f"s_{head}"](pair_input(cur, cur, size)), SOURCE)
            adv = adv + w * (l_st + self.lambda_sa * l_s)
        set_requires_grad(discs, True)
        d_loss = torch.zeros((), device=adv.device)
        for head in self.heads:
            for domain, out, prev in ((SOURCE, s_out, s_prev), (TARGET, t_out, t_prev)):
                cur = out[fused_key(head)].detach()
                d_loss = d_loss + 0.5 * adversarial_bce(self._d[f"st_{head}"](pair_input(cur, prev[head], size)),
                                                        domain)
                d_loss = d_loss + 0.5 * adversarial_bce(self._d[f"s_{head}"](pair_input(cur, cur, size)), domain)
        wd = sum(weight_discrepancy(self.disc[f"st_{h}"].conv_weights(), self.disc[f"s_{h}"].conv_weights())
                 for h in self.heads)
        d_loss = d_loss + self.lambda_u * self.lambda_wd * wd
        return adv, d_loss, {"adv": float(adv.detach()), "d_loss": float(d_loss.detach()), "wd": float(wd.detach())}
