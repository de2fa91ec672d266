"""Supervised terms on ACCEL outputs, shared by the source-only and offline-UDA methods.

The model's outputs are keyed per head: ``fused`` / ``fused_aux`` (the ACCEL prediction of frame
k), ``prev`` / ``prev_aux`` (raw logits of frame k-1); ``fused_key`` and ``prev_key`` name them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.classes import IGNORE_INDEX


def fused_key(head: str) -> str:
    return "fused" if head == "main" else f"fused_{head}"


def prev_key(head: str) -> str:
    return "prev" if head == "main" else f"prev_{head}"


def segmentation_ce(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy of stride-s logits upsampled (bilinear, align_corners=True) to the label size."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=True)
    return F.cross_entropy(logits, label.long(), ignore_index=ignore_index)


def source_terms(out: dict[str, torch.Tensor], label: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, dict]:
    """Supervised CE on the fused main head + ``aux_weight`` x CE on the fused aux head (ADVENT)."""
    loss = segmentation_ce(out["fused"], label)
    logs = {"ce": float(loss.detach())}
    if "fused_aux" in out and aux_weight > 0:
        aux = segmentation_ce(out["fused_aux"], label)
        loss = loss + aux_weight * aux
        logs["ce_aux"] = float(aux.detach())
    return loss, logs


def accel_previous(model: nn.Module, out: dict[str, torch.Tensor], frames: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ACCEL prediction of frame k-1 from (k-1, k-2) per head, without gradients.

    Reuses the raw k-1 logits that ``model(cur, prev, flow)`` computed (``out["prev"]``), so it costs
    one more no-grad forward (frame k-2) plus the fusion.
    """
    if "prev2" not in frames or "flow_prev" not in frames:
        raise KeyError("this method needs frames k-2 and the flow k-1 -> k-2 (dataset extra 'prev2')")
    with torch.no_grad():
        older = model.frame(frames["prev2"])
        return {head: model.fuse(out[prev_key(head)], older[head], frames["flow_prev"])[0]
                for head in older if prev_key(head) in out}
