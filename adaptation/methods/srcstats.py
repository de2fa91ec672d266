"""Adaptation with stored source statistics (``models.source_stats``): a signal beyond self-prediction.

Needs a checkpoint with source statistics (``model.source_stats``; ``make_demo``, ``vss train`` and
``vss import-davsn --stats-from`` record them). Per step, for a batch of target frames t:

1. Pseudo-labels from the frozen starting model (the parent after the BN pre-pass), corrected by
   what the source says about *where* classes are:

   * a class confusion ``M[c', c] = P(predicted c' | true c)`` of the starting model on the target,
     estimated by EM from the counts of its predictions per image cell against the stored position
     prior ``π(c | cell)`` (``estimate_confusion``): on a permutation-like shift (``recolor``: its road
     is predicted as sidewalk, which the source never shows in the middle of the bottom) the predicted
     classes sit where the prior says other classes are, and EM finds the mapping back. The counts
     accumulate over the run, so the estimate sharpens with every batch;
   * the posterior ``q(c | x, cell) ∝ [Σ_c' p(c' | x) M[c', c]] · (π(c | cell) / share(c))^β``
     (the model's posterior already contains the source class shares, hence the division);
   * per predicted class, the ``proportion`` most confident pixels of q are kept (STPL's top-k).

2. Loss: CE of the student's per-frame logits on those labels (``pl_weight``), plus an ActMAD-style
   alignment (``align_weight``): the L1 distance of the batch's per-region means and variances of the
   summarised backbone layers to the stored source ones, each layer scaled by its source spread.

Optionally (``tent_weight``) TENT's entropy of the student's prediction, with BatchNorm in train mode
and its affine parameters trained too. Options beyond these: the shared safeguards (anchor,
restore), ``params``/``bn_train``. Defaults (``adaptation.sourcefree.DEFAULTS``): only the classifier
heads are trained (a relabelling of what the backbone sees), on full, unflipped frames.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.classes import IGNORE_INDEX
from models.source_stats import SourceStats

from ..contract import SourceFreeMethod
from ..ema import SafeguardConfig, Safeguards, frozen_copy
from ..losses import confident_topk, cross_entropy_ignore, tent_loss
from ..options import PARAMS, SAFEGUARDS, Bool, Float, Int
from ..params import bn_affine_params, set_bn_mode
from ..source_stats import capture, region_moments
from ..trainer import LossOutput

EPS = 1e-6


class MissingSourceStats(ValueError):
    """The model has no stored source statistics."""


def estimate_confusion(counts: np.ndarray, prior: np.ndarray, start: np.ndarray | None = None,
                       iterations: int = 50, diagonal: float = 1.0) -> np.ndarray:
    """EM estimate of ``M[c', c] = P(predicted c' | true c)`` (columns sum to 1).

    ``counts``: (cells, K) predicted-class pixel counts per image cell; ``prior``: (cells, K) the source
    p(class | cell). Model: P(predicted c' | cell) = Σ_c prior[cell, c] M[c', c]. ``diagonal``: pseudo-
    count (as a share of the mean count per class) added to M's diagonal, a pull toward "no confusion".
    Pure numpy.
    """
    counts, prior = np.asarray(counts, np.float64), np.asarray(prior, np.float64)
    k = prior.shape[1]
    if start is None:
        start = np.full((k, k), 0.5 / max(k - 1, 1))
        np.fill_diagonal(start, 0.5)
    m = np.asarray(start, np.float64)
    pseudo = diagonal * counts.sum() / k / 100.0 * np.eye(k)
    for _ in range(iterations):
        joint = prior[:, None, :] * m[None]  # (cells, c', c)
        resp = joint / np.maximum(joint.sum(2, keepdims=True), 1e-12)
        m = (counts[:, :, None] * resp).sum(0) + pseudo
        m = m / np.maximum(m.sum(0, keepdims=True), 1e-12)
    return m


def corrected_posterior(probs: torch.Tensor, confusion: torch.Tensor, prior: torch.Tensor, share: torch.Tensor,
                        beta: float) -> torch.Tensor:
    """``q ∝ [Σ_c' p(c'|x) M[c', c]] · (prior(c|pos) / share(c))^β``, normalised over classes.

    ``probs`` (N, K, h, w); ``confusion`` (K, K); ``prior`` (K, h, w) at the same resolution; ``share`` (K,).
    """
    mixed = torch.einsum("nahw,ac->nchw", probs, confusion)
    if beta > 0:
        mixed = mixed * ((prior / share.view(-1, 1, 1).clamp_min(EPS)) ** beta)[None]
    return mixed / mixed.sum(1, keepdim=True).clamp_min(EPS)


def alignment_loss(features: dict[str, torch.Tensor], mean: dict[str, torch.Tensor], var: dict[str, torch.Tensor],
                   grid: tuple[int, int]) -> torch.Tensor:
    """ActMAD-style: per layer, L1 of the batch's per-region means and variances to the source ones,
    divided by the layer's mean source standard deviation / variance (so layers weigh alike)."""
    total = torch.zeros((), device=next(iter(features.values())).device)
    for name, x in features.items():
        m1, m2 = region_moments(x.float(), grid)
        mu, v = m1.mean(0), (m2.mean(0) - m1.mean(0) ** 2).clamp_min(0)
        s_mu, s_v = mean[name], var[name]
        total = total + (mu - s_mu).abs().mean() / s_v.sqrt().mean().clamp_min(EPS) \
            + (v - s_v).abs().mean() / s_v.mean().clamp_min(EPS)
    return total / max(len(features), 1)


class SourceStatsMethod(SourceFreeMethod):
    name = "srcstats"

    OPTIONS = {"pl_weight": Float(0.0, 100.0), "align_weight": Float(0.0, 100.0), "prior_weight": Float(0.0, 10.0),
               "tent_weight": Float(0.0, 100.0),
               "confusion": Bool(), "em_diagonal": Float(0.0, 1000.0), "em_iterations": Int(1, 1000),
               "proportion": Float(0.01, 1.0), "params": PARAMS, "bn_train": Bool(), **SAFEGUARDS}
    SAFEGUARD_DEFAULTS = SafeguardConfig()

    def __init__(self, guard: Safeguards | None = None, pl_weight: float = 1.0, align_weight: float = 0.0,
                 prior_weight: float = 1.0, confusion: bool = True, em_diagonal: float = 1.0,
                 em_iterations: int = 50, proportion: float = 0.7, params: str = "all", bn_train: bool = False,
                 tent_weight: float = 0.0, seed: int = 0) -> None:
        if pl_weight <= 0 and align_weight <= 0 and tent_weight <= 0:
            raise ValueError("srcstats needs pl_weight, align_weight or tent_weight > 0 (nothing to train otherwise)")
        super().__init__(guard, params, bn_train, seed)
        self.pl_weight, self.align_weight, self.prior_weight = pl_weight, align_weight, prior_weight
        self.use_confusion, self.em_diagonal, self.em_iterations = confusion, em_diagonal, em_iterations
        self.proportion, self.tent_weight = proportion, tent_weight
        self.teacher: nn.Module | None = None
        self.stats: SourceStats | None = None
        self.counts: np.ndarray | None = None  # (cells, K) predicted-class counts of the teacher
        self.confusion: np.ndarray | None = None

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        stats = cast("SourceStats | None", model.source_stats)  # AccelSegmenter.source_stats
        if stats is None:
            raise MissingSourceStats("method srcstats needs source statistics stored with the model "
                                     "(models.source_stats; see make_demo, vss train, vss import-davsn --stats-from)")
        if self.teacher is None:
            self.teacher = frozen_copy(model)
        self.stats = stats
        dev = next(model.parameters()).device
        self._prior = torch.from_numpy(stats.prior).to(dev)
        self._share = torch.from_numpy(stats.class_freq).to(dev)
        self._mean = {n: torch.from_numpy(stats.feat_mean[n]).to(dev) for n in stats.layers}
        self._var = {n: torch.from_numpy(stats.feat_var[n]).to(dev) for n in stats.layers}
        k = stats.num_classes
        self.counts = np.zeros((int(np.prod(stats.prior.shape[1:])), k))
        self.confusion = np.eye(k)

    def trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The ``params`` policy, plus the BatchNorm affine parameters when the TENT term is on."""
        named = super().trainable(model)
        if self.tent_weight > 0:
            have = {n for n, _ in named}
            named += [(n, p) for n, p in bn_affine_params(model) if n not in have]
        return named

    def train_mode(self, model: nn.Module) -> None:
        set_bn_mode(model, self.bn_train or self.tent_weight > 0)  # TENT: target batch statistics

    def _update_confusion(self, probs: torch.Tensor) -> torch.Tensor:
        """Add the teacher's predictions to the per-cell counts; re-estimate M on all counts so far."""
        assert self.stats is not None and self.counts is not None and self.confusion is not None
        k, cells = self.stats.num_classes, self.stats.prior.shape[1:]
        onehot = F.one_hot(probs.argmax(1), k).permute(0, 3, 1, 2).double()
        self.counts += F.adaptive_avg_pool2d(onehot, cells).sum(0).reshape(k, -1).T.cpu().numpy()
        # from the same start every time: a warm start would keep an optimum found on the first few frames
        self.confusion = estimate_confusion(self.counts, self.stats.prior.reshape(k, -1).T, None,
                                            self.em_iterations, self.em_diagonal)
        return torch.from_numpy(self.confusion).to(probs.device, probs.dtype)

    def pseudo_labels(self, frames: torch.Tensor) -> torch.Tensor:
        """Top-k confident labels of the corrected posterior of the frozen starting model."""
        assert self.teacher is not None and self.stats is not None
        with torch.no_grad():
            probs = self.teacher.frame(frames)["main"].float().softmax(1)  # type: ignore[operator]
            k = probs.shape[1]
            confusion = self._update_confusion(probs) if self.use_confusion else torch.eye(k, device=probs.device)
            prior = F.interpolate(self._prior[None], size=probs.shape[-2:], mode="bilinear", align_corners=False)[0]
            q = corrected_posterior(probs, confusion, prior, self._share, self.prior_weight)
            labels, _ = confident_topk(q, self.proportion)
        return labels

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> LossOutput:
        assert self.stats is not None, "setup(model) was not called"
        cur = batch["cur"]
        logs: dict[str, float] = {}
        loss = torch.zeros((), device=cur.device)
        with capture(model, self.stats.layers if self.align_weight > 0 else ()) as feats:
            out = model.frame(cur)  # type: ignore[operator]
        if self.pl_weight > 0:
            labels = self.pseudo_labels(cur)
            ce = cross_entropy_ignore(out["main"], labels)
            loss = loss + self.pl_weight * ce
            logs["ce"] = float(ce.detach())
            logs["pl_kept"] = float((labels != IGNORE_INDEX).float().mean())
        if self.tent_weight > 0:
            ent = tent_loss(out["main"])
            loss = loss + self.tent_weight * ent
            logs["entropy"] = float(ent.detach())
        if self.align_weight > 0:
            align = alignment_loss(dict(feats), self._mean, self._var, self.stats.grid)
            loss = loss + self.align_weight * align
            logs["align"] = float(align.detach())
        if self.confusion is not None:
            logs["confusion_diag"] = float(np.diag(self.confusion).mean())
        return LossOutput(self.anchored(loss, logs, out["main"], cur), None, logs)

    def modules(self) -> dict[str, nn.Module]:
        return {}
