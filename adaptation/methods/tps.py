"""TPS (Xing et al., ECCV 2022): temporal pseudo supervision with cross-frame augmentation.

The teacher (the model itself, no gradients, BN on the target batch's statistics as in the
reference) predicts frame k-1 from (k-1, k-2); that prediction, warped to frame k with the flow
k -> k-1, is the pseudo-label of the student, which sees (k, k-1) after one photometric augmentation
shared by both frames and a random rescale. Source frames are histogram-matched to the target frame.

Fixes of the reference (research notes §6.9-6.11), said here because they change results:
* a mirrored teacher input gets a mirrored flow with its x component negated, and the teacher's
  prediction is mirrored back BEFORE it is warped (TPS warps the mirrored map with an unmirrored flow);
* augmentation works on 0..255 RGB (TPS passes mean-subtracted BGR through ToPILImage, which wraps);
* pixels whose warp samples outside frame k-1 are ignored (TPS has no validity mask); an optional
  confidence threshold (0 = none, as TPS).
Batches: see ``adaptation.methods.davsn``; the target needs extra ``prev2``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.warp import warp

from models.classes import IGNORE_INDEX

from ..augment import AugmentConfig, cross_frame_augment
from ..contract import MethodContext, Needs, UDAMethod
from ..losses import cross_entropy_ignore
from ..options import Bool, Float
from ..supervision import fused_key, source_terms
from ..trainer import LossOutput
from ..uda_losses import hflip_flow, histogram_match
from .supervised import SourceOnly

WEIGHT = Float(0.0, 1000.0)


class TPS(UDAMethod, SourceOnly):
    name = "tps"
    needs = Needs(source=(), target=("prev2",))
    # ``scale_range`` and ``augment`` are constructor arguments for code, not options.
    OPTIONS = {"lambda_t": WEIGHT, "aux_weight": WEIGHT, "head_lr_mult": WEIGHT, "style_match": Bool(),
               "flip": Bool(), "threshold": Float(0.0, 1.0), "jitter": Float(0.0, 10.0)}

    @classmethod
    def _build(cls, context: MethodContext, options: dict[str, Any]) -> TPS:
        return cls(seed=context.seed, **options)

    def __init__(self, lambda_t: float = 1.0, aux_weight: float = 0.1, head_lr_mult: float = 10.0,
                 style_match: bool = True, flip: bool = True, scale_range: tuple[float, float] = (0.8, 1.2),
                 threshold: float = 0.0, jitter: float = 0.8, augment: AugmentConfig | None = None,
                 seed: int = 0) -> None:
        super().__init__(aux_weight, head_lr_mult)
        self.lambda_t, self.style_match, self.flip = lambda_t, style_match, flip
        self.scale_range, self.threshold = scale_range, threshold
        # TPS: blur p 0.6, colour jitter (0.8, 0.8, 0.8, 0.2) p 0.8, greyscale p 0.2; ``jitter`` scales the
        # jitter strength (hue = jitter / 4) for short runs where the full strength is too destructive.
        self.augment = augment or AugmentConfig(blur_p=0.6, jitter_p=0.8, brightness=jitter, contrast=jitter,
                                                saturation=jitter, hue=jitter / 4, gray_p=0.2)
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        self.gen.set_state(state["rng"])

    def pseudo_labels(self, model: nn.Module, trg: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Teacher labels for frame k per head, at logit resolution (IGNORE_INDEX where undefined)."""
        prev, prev2, flow_prev = trg["prev"], trg["prev2"], trg["flow_prev"]
        flipped = self.flip and bool(torch.rand((), generator=self.gen) < 0.5)
        with torch.no_grad():
            if flipped:
                prev, prev2, flow_prev = prev.flip(-1), prev2.flip(-1), hflip_flow(flow_prev)
            out = model(prev, prev2, flow_prev)
            labels = {}
            for head in ("main", "aux"):
                if fused_key(head) not in out:
                    continue
                logits = out[fused_key(head)]
                if flipped:
                    logits = logits.flip(-1)  # back to the true orientation, then warp
                probs, valid = warp(logits.float().softmax(1), trg["flow"])
                conf, lab = probs.max(1)
                drop = (valid[:, 0] <= 0) | (conf < self.threshold)
                labels[head] = lab.masked_fill(drop, IGNORE_INDEX)
        return labels

    def _student_frames(self, trg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        cur, prev, _ = cross_frame_augment(trg["cur"], trg["prev"], self.augment, self.gen)
        lo, hi = self.scale_range
        r = lo + (hi - lo) * float(torch.rand((), generator=self.gen))
        h, w = cur.shape[-2:]
        size = (max(8, int(round(h * r / 8)) * 8), max(8, int(round(w * r / 8)) * 8))
        if size != (h, w):
            cur = F.interpolate(cur, size=size, mode="bilinear", align_corners=True)
            prev = F.interpolate(prev, size=size, mode="bilinear", align_corners=True)
        return cur, prev

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        src, trg = batch["source"], batch["target"]
        s_cur, s_prev = src["cur"], src["prev"]
        if self.style_match:
            s_cur, s_prev = histogram_match(s_cur, trg["cur"], s_prev)
        loss, logs = source_terms(model(s_cur, s_prev, src["flow"]), src["label"], self.aux_weight)
        labels = self.pseudo_labels(model, trg)
        cur, prev = self._student_frames(trg)
        # The flow stays on the unscaled grid: ACCEL resizes it and scales its vectors to the logits.
        out = model(cur, prev, trg["flow"])
        target = torch.zeros((), device=loss.device)
        for head, weight in (("main", 1.0), ("aux", self.aux_weight)):
            if head not in labels:
                continue
            lab = labels[head]
            logits = F.interpolate(out[fused_key(head)], size=lab.shape[-2:], mode="bilinear", align_corners=True)
            target = target + weight * cross_entropy_ignore(logits, lab)
        logs["pl_ce"] = float(target.detach())
        logs["pl_kept"] = float((labels["main"] != IGNORE_INDEX).float().mean())
        return LossOutput(loss + self.lambda_t * target, None, logs)
