"""Adaptation losses as pure functions of tensors (no modules, no state, no I/O).

Shared by the source-free methods (``adaptation/methods``) and the offline UDA methods. Shapes:
logits and probabilities are (N, C, H, W); label maps (N, H, W) long with ``IGNORE_INDEX`` = 255;
masks are (N, H, W) or (N, 1, H, W) float/bool. Flow follows ``models.warp``: backward t -> t-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.classes import IGNORE_INDEX
from models.warp import warp

REFINEMENTS = ("consistency", "max-confidence", "warp-frame")  # ``refine_pseudo_labels`` strategies
EPS = 1e-8


def _mask3(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) or (N, H, W) mask -> (N, H, W) float."""
    return (mask[:, 0] if mask.dim() == 4 else mask).to(torch.float32)


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Normalised Shannon entropy per pixel, (N, C, H, W) probabilities -> (N, H, W) in [0, 1].

    ADVENT's ``prob_2_entropy`` keeps the per-channel terms -p log2(p) / log2(C); summed over
    channels they give this map (0 for a one-hot, 1 for the uniform distribution). DA-VSN's I-TCR
    compares channel means of those terms, which is this map divided by C: the same ordering.
    """
    c = probs.shape[1]
    if c < 2:
        return torch.zeros_like(probs[:, 0])
    return -(probs * torch.log(probs.clamp_min(EPS))).sum(1) / math.log(c)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy in nats of softmax(logits): (N, C, H, W) -> (N, H, W) (TENT's objective)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def tent_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TENT: mean softmax entropy over the pixels (optionally only where ``mask`` is set)."""
    ent = softmax_entropy(logits)
    if mask is None:
        return ent.mean()
    m = _mask3(mask)
    return (ent * m).sum() / m.sum().clamp_min(1.0)


def propagate(prev_logits: torch.Tensor, flow: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp the t-1 prediction to t: returns (probabilities, their entropy map, validity (N, H, W)).

    As DA-VSN's I-TCR, the probabilities AND the entropy map are propagated (not the entropy of the
    interpolated probabilities). DA-VSN splats with nearest rounding in NumPy; we warp bilinearly
    backward (the TPS operator, see ``models.warp``). Everything is computed without gradients.
    """
    with torch.no_grad():
        probs = prev_logits.float().softmax(1)
        both = torch.cat((probs, entropy_map(probs)[:, None]), dim=1)
        if flow is None:
            return probs, both[:, -1], torch.ones_like(both[:, 0])
        warped, valid = warp(both, flow)
        return warped[:, :-1], warped[:, -1], valid[:, 0]


def itcr_loss(cur_logits: torch.Tensor, prop_probs: torch.Tensor, prop_entropy: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
    """I-TCR (DA-VSN eq. 5, source-free form), as the reference implements it.

    w = valid * [entropy(propagated t-1) < entropy(current)] (a hard indicator, per pixel), and the loss is
    mean over N*C*H*W of w * |softmax(current) - propagated|. Gradients flow only through the
    current prediction: the propagated prediction, both entropies and the weight are constants.
    Zero when both predictions agree.
    """
    p = cur_logits.float().softmax(1)
    with torch.no_grad():
        w = _mask3(valid) * (prop_entropy < entropy_map(p)).float()
    return (w[:, None] * (p - prop_probs.detach()).abs()).mean()


def confident_topk(probs: torch.Tensor, proportion: float = 0.7,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """STPL's top-k pseudo-labels: per predicted class, keep its ``proportion`` most confident pixels.

    Returns (labels (N, H, W) long with unkept pixels set to IGNORE_INDEX, kept mask (N, H, W) bool).
    Counting is over the whole batch: a class predicted on n pixels keeps round(proportion * n) of them
    (at least one), ranked by max probability; ties are broken by pixel order.
    """
    if not 0.0 < proportion <= 1.0:
        raise ValueError(f"proportion must be in (0, 1], got {proportion}")
    conf, pred = probs.detach().max(1)
    flat_conf, flat_pred = conf.flatten(), pred.flatten()
    ok = torch.ones_like(flat_pred, dtype=torch.bool) if valid is None else _mask3(valid).flatten() > 0
    keep = torch.zeros_like(ok)
    for c in flat_pred[ok].unique().tolist():
        idx = torch.nonzero(ok & (flat_pred == c)).flatten()
        n_keep = max(1, int(round(proportion * idx.numel())))
        order = torch.argsort(flat_conf[idx], descending=True, stable=True)
        keep[idx[order[:n_keep]]] = True
    labels = torch.where(keep, flat_pred, torch.full_like(flat_pred, IGNORE_INDEX))
    return labels.view_as(pred), keep.view_as(pred)


def sample_pixels(labels: torch.Tensor, max_total: int = 1024, generator: torch.Generator | None = None,
                  num_classes: int | None = None) -> torch.Tensor:
    """Class-balanced random pixel indices into ``labels.flatten()`` (IGNORE_INDEX never sampled).

    Each present class gets an equal share of ``max_total`` (unused shares go to larger classes), so
    memory stays bounded and rare classes are not drowned out. Deterministic for a seeded generator.
    """
    flat = labels.flatten()
    classes = [c for c in flat.unique().tolist() if c != IGNORE_INDEX]
    if num_classes is not None:
        classes = [c for c in classes if c < num_classes]
    if not classes or max_total <= 0:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    pools = [torch.nonzero(flat == c).flatten() for c in classes]
    sizes = sorted(range(len(pools)), key=lambda i: pools[i].numel())
    budget, picked = max_total, []
    for rank, i in enumerate(sizes):
        share = budget // (len(sizes) - rank)
        pool = pools[i]
        if pool.numel() > share:
            perm = torch.randperm(pool.numel(), generator=generator, device="cpu")[:share].to(pool.device)
            pool = pool[perm]
        picked.append(pool)
        budget -= pool.numel()
    return torch.cat(picked)


def pixel_contrastive_loss(queries: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor,
                           key_labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Pixel-to-pixel supervised contrastive loss (STPL eq. 3-4) between two sets of embeddings.

    ``queries`` (M, D) with labels (M,), ``keys`` (K, D) with labels (K,); embeddings are L2-normalised
    here. For a query q, positives are the keys of its class and negatives the keys of other classes:
        L_q = -1/|P_q| sum_{q+} log( exp(q.q+/t) / (exp(q.q+/t) + sum_{q-} exp(q.q-/t)) ).
    STPL's printed eq. 3 leaves the positive out of the denominator; we keep it in, as the pixel
    contrast it builds on (Wang et al. 2021) and SupCon do, which bounds the loss below by 0 and
    leaves the gradient direction unchanged. Queries without any positive key are skipped; the result
    is the mean over the remaining queries (0 when there are none).
    """
    if queries.numel() == 0 or keys.numel() == 0:
        return queries.sum() * 0.0 + keys.sum() * 0.0
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    sim = q @ k.t() / temperature  # (M, K)
    pos = query_labels[:, None] == key_labels[None, :]
    # log(exp(s_pos) + sum_neg exp(s_neg)) for each (query, positive) pair, computed stably.
    # A large finite fill (not -inf) keeps the gradient finite for queries without negatives.
    neg_lse = torch.logsumexp(sim.masked_fill(pos, -1e4), dim=1, keepdim=True)  # (M, 1)
    log_prob = sim - torch.logaddexp(sim, neg_lse)  # only meaningful where pos
    n_pos = pos.sum(1)
    per_query = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    use = n_pos > 0
    if not use.any():
        return sim.sum() * 0.0
    return per_query[use].mean()


def refine_pseudo_labels(cur_probs: torch.Tensor, prop_probs: torch.Tensor, valid: torch.Tensor,
                         strategy: str = "consistency", threshold: float = 0.0,
                         fill_invalid: bool = True) -> torch.Tensor:
    """Temporal pseudo-label refinement of UnifiedVideoDA §3.3 -> labels (N, H, W), IGNORE_INDEX = dropped.

    ``cur_probs``: the current frame's prediction; ``prop_probs``: the previous frame's prediction warped
    to t; ``valid``: where the warp is defined. Strategies:
      * ``consistency``: keep the current label where it equals the warped one, drop the rest;
      * ``max-confidence``: per pixel take the label of the more confident of the two predictions;
      * ``warp-frame``: use the warped label (TPS); with ``fill_invalid`` invalid pixels take the
        current label (UnifiedVideoDA's ``--pl-fill``), else they are dropped.
    Outside the warp's validity ``consistency`` drops pixels; ``max-confidence`` uses the current label.
    Finally pixels whose chosen confidence is below ``threshold`` are dropped.
    """
    cur_conf, cur_lab = cur_probs.detach().max(1)
    prop_conf, prop_lab = prop_probs.detach().max(1)
    v = _mask3(valid) > 0
    ignore = torch.full_like(cur_lab, IGNORE_INDEX)
    if strategy == "consistency":
        keep = v & (cur_lab == prop_lab)
        labels, conf = torch.where(keep, cur_lab, ignore), torch.minimum(cur_conf, prop_conf)
    elif strategy == "max-confidence":
        take_prop = v & (prop_conf > cur_conf)
        labels = torch.where(take_prop, prop_lab, cur_lab)
        conf = torch.where(take_prop, prop_conf, cur_conf)
    elif strategy == "warp-frame":
        fallback = cur_lab if fill_invalid else ignore
        labels = torch.where(v, prop_lab, fallback)
        conf = torch.where(v, prop_conf, cur_conf)
    else:
        raise ValueError(f"unknown refinement strategy {strategy!r}; choose consistency, max-confidence "
                         "or warp-frame")
    if threshold > 0:
        labels = torch.where(conf >= threshold, labels, ignore)
    return labels


def cross_entropy_ignore(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel CE at the logits' resolution (labels are resized by nearest if needed); 0 when all ignored.

    ``weight`` is an optional per-pixel weight (N, H, W). Unlike ``F.cross_entropy`` this never
    returns NaN for a batch whose pixels are all ignored.
    """
    if labels.shape[-2:] != logits.shape[-2:]:
        labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    labels = labels.long()
    keep = labels != ignore_index
    if not keep.any():
        return logits.sum() * 0.0
    per_pixel = F.cross_entropy(logits.float(), labels.masked_fill(~keep, 0), reduction="none")
    w = keep.float() if weight is None else keep.float() * _mask3(weight)
    return (per_pixel * w).sum() / w.sum().clamp_min(EPS) if w.sum() > 0 else logits.sum() * 0.0


def anchor_loss(logits: torch.Tensor, anchor_logits: torch.Tensor, confidence: float = 0.9) -> torch.Tensor:
    """Regulariser toward a frozen parent: CE to the parent's labels where the parent is confident.

    Keeps an adapting model from drifting away on pixels the source model already gets right
    (CoTTA's anchor idea, used here as a loss instead of a teacher switch). 0 if no pixel qualifies.
    """
    with torch.no_grad():
        conf, lab = anchor_logits.float().softmax(1).max(1)
        lab = lab.masked_fill(conf < confidence, IGNORE_INDEX)
    return cross_entropy_ignore(logits, lab)


def diversity_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the batch-mean prediction (SHOT's diversity term, >= -log C).

    Added to entropy minimisation it penalises collapsing every pixel onto one class.
    """
    mean = logits.float().softmax(1).mean((0, 2, 3))
    return (mean * torch.log(mean.clamp_min(EPS))).sum()


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of -sum_c target_c log softmax(logits)_c (CoTTA's student loss toward its teacher).

    ``target_probs`` (N, C, h, w) is a constant; it is resized bilinearly to the logits' resolution if
    needed. Equals the softmax entropy of the logits when the target is their own softmax.
    """
    target = target_probs.detach().float()
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def mean_confidence(probs: torch.Tensor) -> float:
    """Mean over pixels of the max class probability of (N, C, H, W) probabilities, in [1/C, 1]."""
    return float(probs.detach().max(1).values.mean())


def scaled_view(frames: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
    """An augmented view of (N, 3, H, W) frames: resized by ``scale`` (bilinear), mirrored if ``flip``."""
    x = frames
    if scale != 1.0:
        h, w = frames.shape[-2:]
        x = F.interpolate(x, size=(max(8, round(h * scale)), max(8, round(w * scale))), mode="bilinear",
                          align_corners=False)
    return torch.flip(x, dims=(-1,)) if flip else x


def unview(probs: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """Inverse of ``scaled_view`` for a prediction: mirror back if ``flip``, resize to ``size`` (bilinear)."""
    x = torch.flip(probs, dims=(-1,)) if flip else probs
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x
