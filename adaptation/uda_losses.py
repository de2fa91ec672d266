"""Pure tensor functions of the offline UDA methods (DA-VSN, TPS, I2VDA, UnifiedVideoDA).

The source-free pieces they share (entropy map, I-TCR, pseudo-label refinement, CE with ignore)
live in ``adaptation.losses``; this file holds what only UDA needs: adversarial objectives, the
discriminators' weight discrepancy, discriminator inputs, style matching, frame interpolation,
occlusion masks and class mixing. Shapes: logits/probabilities (N, C, H, W); labels (N, H, W) long
with 255 = ignore; frames (N, 3, H, W) float RGB 0..255; flow (N, 2, H, W) backward (``models.warp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.warp import warp

from .losses import IGNORE_INDEX, entropy_map

SOURCE, TARGET = 0.0, 1.0  # domain labels of the discriminators (ADVENT / DA-VSN convention)


def adversarial_bce(d_out: torch.Tensor, domain: float) -> torch.Tensor:
    """BCE-with-logits of a patch map against a constant domain label (DA-VSN, ADVENT)."""
    return F.binary_cross_entropy_with_logits(d_out, torch.full_like(d_out, domain))


def adversarial_lsgan(d_out: torch.Tensor, domain: float) -> torch.Tensor:
    """Least-squares GAN loss: mean (D(x) - label)^2 (I2VDA eq. 11-12, UnifiedVideoDA 'LS')."""
    return F.mse_loss(d_out, torch.full_like(d_out, domain))


def weight_discrepancy(weights_a: list[torch.Tensor], weights_b: list[torch.Tensor]) -> torch.Tensor:
    """DA-VSN eq. 3 as implemented: mean over layers j of cos(w_a^j, w_b^j) + 1 (flattened weights).

    2 for identical discriminators, 0 for opposite ones; minimising it decorrelates D_st from D_s.
    (The paper sums cosines over the J conv layers; the +1 only shifts it to be non-negative.)
    """
    if len(weights_a) != len(weights_b) or not weights_a:
        raise ValueError(f"need the same non-zero number of layers, got {len(weights_a)} and {len(weights_b)}")
    terms = []
    for a, b in zip(weights_a, weights_b):
        if a.shape != b.shape:
            raise ValueError(f"layer shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        terms.append(F.cosine_similarity(a.flatten(), b.flatten(), dim=0) + 1.0)
    return torch.stack(terms).mean()


def softmax_up(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample logits to ``size`` (bilinear, align_corners=True) and take the per-pixel softmax."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True).softmax(1)


def pair_input(first: torch.Tensor, second: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Discriminator input [softmax(first), softmax(second)] at ``size``: (N, 2C, H, W).

    Each frame gets its own softmax. DA-VSN and UnifiedVideoDA take one joint softmax over the 2C
    concatenation, which mixes the two frames' confidences; the papers stack two predictions.
    """
    return torch.cat((softmax_up(first, size), softmax_up(second, size)), dim=1)


def histogram_match(x: torch.Tensor, ref: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample, per-channel quantile mapping of ``x`` onto the histogram of ``ref`` (TPS style matching).

    The mapping learnt from ``x`` is applied to ``others`` too (e.g. the previous source frame), so a
    frame pair stays photometrically consistent and its flow stays valid. Returns [x', *others'].
    """
    outs = [torch.empty_like(x)] + [torch.empty_like(o) for o in others]
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            src = x[n, c].flatten().sort().values
            dst = ref[n, c].flatten().sort().values
            for out, img in zip(outs, (x, *others)):
                v = img[n, c]
                rank = torch.searchsorted(src, v.flatten().contiguous(), right=True) - 1  # last source value <= v
                q = rank.clamp(min=0).float() / max(src.numel() - 1, 1)
                idx = (q * (dst.numel() - 1)).round().long()
                out[n, c] = dst[idx].view_as(v)
    return outs


def scale_flow(flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Multiply each sample's flow by its own factor t (N,)."""
    return flow * t.view(-1, 1, 1, 1).to(flow.dtype)


def interpolate_frame(i0: torch.Tensor, i1: torch.Tensor, flow_10: torch.Tensor, flow_01: torch.Tensor,
                      t: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """I2VDA eq. 2-3: synthesise frame I_t between I_0 (t-1) and I_1 (t), t in (0, 1) per sample.

    ``flow_10`` is our backward flow I_1 -> I_0 (pixel p of I_1 was at p + flow_10(p) in I_0) and
    ``flow_01`` the flow I_0 -> I_1. With locally smooth flow F_t->0 ~ t F_1->0 and F_t->1 ~ (1-t) F_0->1,
    and I_t = alpha W(I_0, F_t->0) + (1 - alpha) W(I_1, F_t->1), W a bilinear backward warp.
    """
    w0, _ = warp(i0, scale_flow(flow_10, t))
    w1, _ = warp(i1, scale_flow(flow_01, 1.0 - t))
    return alpha * w0 + (1.0 - alpha) * w1


def occlusion_mask(flow_10: torch.Tensor, flow_01: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """Forward-backward consistency on the grid of I_1: (N, H, W) bool, True where NOT occluded.

    I2VDA eq. 7 writes the check on I_0's grid, W(F_1->0, F_0->1) + F_0->1 < eta, but applies the mask to
    the prediction of I_1 (eq. 8). We check on I_1's grid, |F_1->0(p) + F_0->1(p + F_1->0(p))| < eta, and
    also drop pixels whose match falls outside I_0.
    """
    back, valid = warp(flow_01, flow_10)
    err = (flow_10 + back).norm(dim=1)
    return (err < eta) & (valid[:, 0] > 0)


def entropy_pseudo_labels(probs: torch.Tensor, delta: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """I2VDA eq. 8: argmax where the normalised entropy is below ``delta`` (and ``keep``), else ignore."""
    with torch.no_grad():
        labels = probs.argmax(1)
        ok = entropy_map(probs) < delta
        if keep is not None:
            ok &= keep.bool()
        return labels.masked_fill(~ok, IGNORE_INDEX)


def class_mix_mask(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DACS ClassMix: per sample, a (N, H, W) float mask of half of the classes present in ``labels``."""
    masks = []
    for lab in labels:
        classes = lab.unique()
        classes = classes[classes != IGNORE_INDEX]
        n = classes.numel()
        chosen = classes[torch.randperm(n, generator=generator)[: (n + n % 2) // 2].to(classes.device)]
        masks.append(torch.isin(lab, chosen).float())
    return torch.stack(masks)


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where mask = 1, ``b`` elsewhere; ``mask`` (N, H, W) broadcasts over channels."""
    m = mask if a.dim() == mask.dim() else mask[:, None]
    return m * a + (1 - m) * b if a.is_floating_point() else torch.where(m.bool(), a, b)


def pseudo_weight(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """DACS pseudo-label weight: the fraction of each image's pixels whose confidence reaches ``threshold``."""
    return (probs.max(1).values >= threshold).float().mean((1, 2))


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DACS's weighted CE: mean over ALL pixels of weight * CE (ignored pixels contribute 0).

    Unlike ``adaptation.losses.cross_entropy_ignore`` the weights are not renormalised, so a scalar
    pseudo-label weight of 0.3 really scales the loss by 0.3. Logits are upsampled (bilinear,
    align_corners=True) to the label size, as DACS computes the loss at full resolution.
    """
    if labels.shape[-2:] != logits.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    keep = labels != IGNORE_INDEX
    per_pixel = F.cross_entropy(logits.float(), labels.masked_fill(~keep, 0), reduction="none")
    return (per_pixel * weight * keep).mean()


def hflip_flow(flow: torch.Tensor) -> torch.Tensor:
    """Mirror a flow field left-right: the field is mirrored AND its x component negated.

    TPS mirrors the flow field but keeps u, which points every vector the wrong way (research §6.9).
    """
    flipped = flow.flip(-1).clone()
    flipped[:, 0] = -flipped[:, 0]
    return flipped
