"""CoTTA-style continual test-time adaptation (Wang et al., CVPR'22), as a baseline on the same loop.

Per step, for a batch of (t-1, t) pairs:
1. Teacher target: the EMA teacher predicts frame t. When its mean confidence (mean max probability)
   is below ``confidence``, the prediction is instead the average of the softmax over augmented views
   (the identity, mirrored, and rescaled by ``num_scales`` factors from 1, 0.75, 1.25, 0.5, 1.5, each
   mirrored too if ``flip``), mapped back to the identity view (``losses.scaled_view``/``unview``).
   CoTTA decides on the frozen source model's confidence; here the teacher's own is used (no
   third copy of the network, one forward fewer per step).
2. Student: the fused ACCEL output for the original pair, trained with the soft cross-entropy
   toward the teacher's probabilities (``losses.soft_cross_entropy``).
3. After the optimiser step (``Safeguards.after_step``): teacher <- EMA of the student
   (``ema_momentum``), then every trained element is reset to its value at the start of the run with
   probability ``restore_p`` (stochastic restore).

In the service a run is one round: the "source" of the restore is the round's parent (after the
BatchNorm pre-pass), not the very first model of the stream. As in CoTTA the teacher is what
predicts afterwards: ``finish`` copies its weights into the model (``publish="teacher"``); with
``publish="student"`` the student is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..contract import SourceFreeMethod
from ..ema import SafeguardConfig, Safeguards
from ..losses import mean_confidence, scaled_view, soft_cross_entropy, unview
from ..options import PARAMS, SAFEGUARDS, Bool, Choice, Float, Int
from ..trainer import LossOutput

SCALES = (1.0, 0.75, 1.25, 0.5, 1.5)  # the first ``num_scales`` are used
PUBLISH = ("teacher", "student")


def views(num_scales: int, flip: bool) -> list[tuple[float, bool]]:
    """The (scale, mirrored) views averaged when the teacher is unsure, identity first."""
    return [(s, f) for s in SCALES[:num_scales] for f in ((False, True) if flip else (False,))]


@torch.no_grad()
def teacher_probs(teacher: nn.Module, frames: torch.Tensor, confidence: float, num_scales: int,
                  flip: bool) -> tuple[torch.Tensor, bool]:
    """The teacher's per-frame softmax for ``frames`` at its logit resolution, and whether it is the
    augmentation average (taken when the plain prediction's mean confidence is below ``confidence``)."""
    plain = teacher.frame(frames)["main"].float().softmax(1)  # type: ignore[operator]
    extra = views(num_scales, flip)[1:]
    if mean_confidence(plain) >= confidence or not extra:
        return plain, False
    size = (int(plain.shape[-2]), int(plain.shape[-1]))
    total = plain.clone()
    for scale, mirrored in extra:
        out = teacher.frame(scaled_view(frames, scale, mirrored))["main"].float().softmax(1)  # type: ignore[operator]
        total += unview(out, size, mirrored)
    return total / (len(extra) + 1), True


class CoTTA(SourceFreeMethod):
    name = "cotta"

    OPTIONS = {"confidence": Float(0.0, 1.0), "num_scales": Int(1, len(SCALES)), "flip": Bool(),
               "publish": Choice(*PUBLISH), "params": PARAMS, "bn_train": Bool(), **SAFEGUARDS}
    SAFEGUARD_DEFAULTS = SafeguardConfig(ema_momentum=0.99, restore_p=0.01)

    def __init__(self, guard: Safeguards | None = None, confidence: float = 0.9, num_scales: int = 3,
                 flip: bool = True, publish: str = "teacher", params: str = "all", bn_train: bool = False,
                 seed: int = 0) -> None:
        if publish not in PUBLISH:
            raise ValueError(f"publish must be one of {PUBLISH}, got {publish!r}")
        super().__init__(guard, params, bn_train, seed)
        self.confidence, self.num_scales, self.flip, self.publish = confidence, num_scales, flip, publish

    def setup(self, model: nn.Module) -> None:
        """Snapshot the teacher (always: CoTTA needs one) and the restore source."""
        self.guard.attach(model, {n for n, _ in self.trainable(model)}, need_teacher=True)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        teacher = self.guard.teacher
        assert teacher is not None, "setup(model) was not called"
        target, augmented = teacher_probs(teacher, batch["cur"], self.confidence, self.num_scales, self.flip)
        out = model(batch["cur"], batch["prev"], batch.get("flow"))
        ce = soft_cross_entropy(out["fused"], target)
        logs = {"consistency": float(ce.detach()), "teacher_conf": mean_confidence(target),
                "augmented": float(augmented)}
        return LossOutput(self.anchored(ce, logs, out["cur"], batch["cur"]), None, logs)

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Publish the teacher's weights (CoTTA predicts with the teacher) unless ``publish="student"``."""
        teacher = self.guard.teacher
        if self.publish != "teacher" or teacher is None:
            return
        for mp, tp in zip(model.parameters(), teacher.parameters(), strict=True):
            mp.copy_(tp)
