"""STPL (Lo et al., CVPR'23): spatio-temporal pixel-level contrastive learning, source-free.

One step, for a batch of (t-1, t) pairs with backward flow:
1. Pseudo-labels: the labeler (EMA teacher with target BN statistics, DESIGN §4; or the model)
   predicts the fused ACCEL output for t; per predicted class the top ``proportion`` (0.7) most
   confident pixels are kept (``losses.confident_topk``).
2. Cross-frame augmentation: Gaussian blur + colour jitter drawn once per pair and applied to both
   frames (``adaptation.augment``).
3. Spatio-temporal features: the per-frame network's last features of t (with gradients) and of t-1
   (without, as the ACCEL clip forward), the t-1 features warped to t by the flow, fused by the
   method's fusion block (STAM / concat / conv1x1 / add) and projected by its projection head;
   likewise for the augmented pair.
4. Loss: pixel supervised contrastive loss (tau 0.07) between original queries and augmented keys,
   on class-balanced samples of confident pixels (at most ``max_pixels`` each; bounded memory).

Variants (STPL §3.3): ``spatial`` contrasts z_t with the augmented z~_t (no fusion);
``temporal`` uses no augmentation and contrasts z_t with z_{t-1} (labels of t-1 from the labeler).
Options beyond the paper, off unless set: ``ce_weight`` adds CE on the confident pseudo-labels
(for the augmented view), and the shared safeguards (anchor, stochastic restore).
The fusion block and the projection head are this method's own modules (``aux_param_groups``),
trained jointly by the same loss and discarded after adaptation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.classes import IGNORE_INDEX
from models.warp import warp

from ..augment import AugmentConfig, cross_frame_augment
from ..contract import SourceFreeMethod
from ..ema import SafeguardConfig, Safeguards
from ..losses import confident_topk, cross_entropy_ignore, pixel_contrastive_loss, sample_pixels
from ..options import PARAMS, SAFEGUARDS, Bool, Choice, Float, Int
from ..trainer import LossOutput
from .stpl_heads import FUSIONS, STPLHeads

VARIANTS = ("spatio-temporal", "spatial", "temporal")


def _pixels(z: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) -> (N*H*W, D), row order matching ``labels.flatten()`` of (N, H, W)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


class STPL(SourceFreeMethod):
    name = "stpl"

    OPTIONS = {"fusion": Choice(*FUSIONS), "variant": Choice(*VARIANTS), "proportion": Float(0.01, 1.0),
               "temperature": Float(0.001, 10.0), "dim": Int(1, 1024), "max_pixels": Int(16, 65536),
               "ce_weight": Float(0.0, 100.0), "head_lr_mult": Float(0.0, 1000.0), "head_warmup": Int(0, 100000),
               "params": PARAMS, "bn_train": Bool(), "blur_p": Float(0.0, 1.0), "jitter_p": Float(0.0, 1.0),
               **SAFEGUARDS}
    SAFEGUARD_DEFAULTS = SafeguardConfig(ema_momentum=0.99)

    def __init__(self, guard: Safeguards | None = None, fusion: str = "stam", variant: str = "spatio-temporal",
                 proportion: float = 0.7, temperature: float = 0.07, dim: int = 64, max_pixels: int = 1024,
                 ce_weight: float = 0.0, head_lr_mult: float = 10.0, head_warmup: int = 0, params: str = "all",
                 bn_train: bool = False, blur_p: float = 0.5, jitter_p: float = 0.8, seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown STPL variant {variant!r}; choose one of {VARIANTS}")
        super().__init__(guard, params, bn_train, seed)
        self.fusion = "none" if variant != "spatio-temporal" else fusion
        self.variant, self.proportion, self.temperature = variant, proportion, temperature
        self.dim, self.max_pixels, self.ce_weight = dim, max_pixels, ce_weight
        self.head_lr_mult, self.head_warmup = head_lr_mult, head_warmup
        self.augment = AugmentConfig(blur_p=blur_p, jitter_p=jitter_p)
        self.generator = torch.Generator().manual_seed(seed)
        self.heads: STPLHeads | None = None

    def setup(self, model: nn.Module) -> None:
        """Snapshot the safeguards' copies, then build the fusion block and projection head (random init)."""
        super().setup(model)
        if self.heads is not None:  # a second optimiser for the same run (the loop called again)
            return
        channels = int(model.net.feature_channels)  # type: ignore[union-attr]
        self.heads = STPLHeads(self.fusion, channels, self.dim).to(next(model.parameters()).device)

    def modules(self) -> dict[str, nn.Module]:
        return {"heads": self.heads} if self.heads is not None else {}

    def aux_param_groups(self) -> list[dict[str, Any]]:
        if self.heads is None:
            raise RuntimeError("STPL.setup(model) must be called before aux_param_groups()")
        return [{"params": list(self.heads.parameters()), "lr_mult": self.head_lr_mult}]

    def train_mode(self, model: nn.Module) -> None:
        super().train_mode(model)
        if self.heads is not None:
            self.heads.train()

    def _labels(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-k confident pseudo-labels of t (fused), and of t-1 (per frame) for the temporal variant."""
        with torch.no_grad():
            out = self.guard.labeler(model)(batch["cur"], batch["prev"], batch.get("flow"))
            cur, _ = confident_topk(out["fused"].softmax(1), self.proportion)
            prev = confident_topk(out["prev"].softmax(1), self.proportion)[0] if self.variant == "temporal" else None
        return cur, prev

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        assert self.heads is not None, "setup(model) was not called"
        cur, prev, flow = batch["cur"], batch["prev"], batch.get("flow")
        n = cur.shape[0]
        labels, prev_labels = self._labels(model, batch)
        if self.variant == "temporal":
            aug_cur, aug_prev = cur, prev
        else:
            aug_cur, aug_prev, _ = cross_frame_augment(cur, prev, self.augment, self.generator)
        student = model.frame(torch.cat((cur, aug_cur)), with_features=True)  # type: ignore[operator]
        feat = student["feat"]
        if step < self.head_warmup:
            feat = feat.detach()  # let the fresh heads settle before they steer the backbone
        with torch.no_grad():
            past = model.frame(torch.cat((prev, aug_prev)), with_features=True)  # type: ignore[operator]
        if self.variant == "spatio-temporal":
            warped = warp(past["feat"], torch.cat((flow, flow)))[0] if flow is not None else past["feat"]
            z = self.heads(warped, feat)
            queries, keys = _pixels(z[:n]), _pixels(z[n:])
            key_labels = labels
        elif self.variant == "spatial":
            z = self.heads(None, feat)
            queries, keys = _pixels(z[:n]), _pixels(z[n:])
            key_labels = labels
        else:  # temporal: z_t against z_{t-1} (no augmentation, no fusion)
            queries = _pixels(self.heads(None, feat[:n]))
            keys = _pixels(self.heads(None, past["feat"][:n]))
            assert prev_labels is not None
            key_labels = prev_labels
        qi = sample_pixels(labels, self.max_pixels, self.generator)
        ki = sample_pixels(key_labels, self.max_pixels, self.generator)
        con = pixel_contrastive_loss(queries[qi], labels.flatten()[qi], keys[ki], key_labels.flatten()[ki],
                                     self.temperature)
        loss, logs = con, {"contrast": float(con.detach()), "pl_kept": float((labels != IGNORE_INDEX).float().mean())}
        if self.ce_weight > 0:
            view = slice(n, 2 * n) if self.variant != "temporal" else slice(0, n)
            fused, _ = model.fuse(student["main"][view], past["main"][view], flow)  # type: ignore[operator]
            ce = cross_entropy_ignore(fused, labels)
            loss = loss + self.ce_weight * ce
            logs["ce"] = float(ce.detach())
        return LossOutput(self.anchored(loss, logs, student["main"][:n], cur), None, logs)
