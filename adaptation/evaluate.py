"""Dataset evaluation of an ACCEL model: mIoU per class and temporal consistency (TC).

Protocol (DA-VSN/TPS): frame k and k-1 with the flow k -> k-1 go through the model; the fused main
logits are upsampled (bilinear, align_corners=True) to the label size, argmax, one accumulated
confusion matrix, IoU per class, mIoU = mean over the classes present (minus the dataset's
``eval_exclude``, e.g. SYNTHIA's fence). TC: the prediction of frame k against the prediction of
frame k-1 (itself fused from k-1 and k-2) warped to k by the flow, at the input resolution, as the
share of warp-valid pixels that agree (UnifiedVideoDA's ``pred_pred`` / ESVS's TC).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from models.checkpoint import load_checkpoint

from .datasets import DataSpec, VideoFrameDataset, accepted_options, build_dataset, label_space_of, parse_spec
from .distributed import unwrap_model
from .metrics import confusion_matrix, iou_from_confusion, temporal_consistency


def subset_indices(n: int, max_items: int | None) -> list[int]:
    """All indices, or ``max_items`` evenly spread ones (deterministic)."""
    if max_items is None or max_items >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_items).round().astype(int).tolist()))


def _up(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, dataset: VideoFrameDataset, device: torch.device | str = "cpu",
             batch_size: int = 1, max_items: int | None = None, num_workers: int = 0,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """mIoU (percent, per class) and TC (percent) of ``model`` on ``dataset`` (which must have labels)."""
    if not dataset.labels:
        raise ValueError(f"{dataset.name} was built without labels; cannot compute mIoU")
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    classes = list(dataset.classes)
    conf = np.zeros((len(classes), len(classes)), np.int64)
    agree = valid = 0
    idx = subset_indices(len(dataset), max_items)
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, num_workers=num_workers)
    done = 0
    try:
        for batch in loader:
            b = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            out = model(b["cur"], b["prev"], b["flow"])
            label = batch["label"].numpy()
            pred = _up(out["fused"], label.shape[-2:]).argmax(1).cpu().numpy()
            conf += confusion_matrix(pred, label, len(classes))
            if "prev2" in b:
                size = tuple(b["cur"].shape[-2:])
                prev_fused, _ = model.fuse(out["prev"], model.frame(b["prev2"])["main"], b["flow_prev"])
                p_t = _up(out["fused"], size).argmax(1).cpu().numpy()
                p_prev = _up(prev_fused, size).argmax(1).cpu().numpy()
                flow = b["flow"].permute(0, 2, 3, 1).cpu().numpy()
                for n in range(p_t.shape[0]):
                    a, v = temporal_consistency(p_t[n], p_prev[n], flow[n])
                    agree, valid = agree + a, valid + v
            done += pred.shape[0]
            if on_batch is not None:
                on_batch(done, len(idx))
    finally:
        model.train(was_training)
    return summarize(conf, classes, dataset.eval_exclude, agree, valid, done)


def summarize(conf: np.ndarray, classes: list[str], exclude: tuple[str, ...], agree: int, valid: int,
              items: int) -> dict[str, Any]:
    ious = iou_from_confusion(conf)
    use = np.array([c not in exclude for c in classes]) & ~np.isnan(ious)
    return {
        "miou": round(float(ious[use].mean() * 100), 2) if use.any() else None,
        "per_class": {c: (round(float(v) * 100, 2) if not np.isnan(v) else None) for c, v in zip(classes, ious)},
        "excluded": list(exclude),
        "tc": round(100.0 * agree / valid, 2) if valid else None,
        "items": items,
    }


def build_eval_dataset(spec: DataSpec | str, split: str, size: tuple[int, int], **kw: Any) -> VideoFrameDataset:
    """The labelled split with frame k-2 for TC; without it (TC skipped) when k-2 or its flow is missing,
    e.g. DA-VSN ships only k -> k-1 flow files for Cityscapes val."""
    try:
        return build_dataset(spec, split, size, extras=("prev2",), **kw)
    except FileNotFoundError as e:
        dataset = build_dataset(spec, split, size, **kw)
        warnings.warn(f"temporal consistency not computed: {e}", stacklevel=2)
        return dataset


def evaluate_checkpoint(checkpoint: str | Path, data: str, split: str = "val", flow: str | None = None,
                        flow_dir: str | None = None, input_size: tuple[int, int] | None = None,
                        max_items: int | None = None, device: str = "cpu", num_workers: int = 0,
                        native_labels: bool = False, with_tc: bool = True, **dataset_options: Any) -> dict[str, Any]:
    """``vss eval --data``: load a checkpoint, build the dataset in its label space, evaluate.

    ``dataset_options`` go to the dataset class (e.g. ``clips`` / ``frames_per_clip`` for synthetic data).
    """
    model, meta = load_checkpoint(checkpoint)
    spec = parse_spec(data)
    size = tuple(input_size or meta["input_size"])
    space = label_space_of(meta["classes"]) if spec.name == "cityscapes-seq" else None
    kw = dict(flow=flow, label_space=space, flow_dir=flow_dir, native_labels=native_labels,
              **accepted_options(spec, dataset_options))
    dataset = build_eval_dataset(spec, split, size, **kw) if with_tc else build_dataset(spec, split, size, **kw)
    if list(dataset.classes) != list(meta["classes"]):
        raise ValueError(f"{spec} is labelled with {list(dataset.classes)} but the checkpoint predicts "
                         f"{list(meta['classes'])}")
    model.to(device)
    result = evaluate(model, dataset, device, batch_size=1, max_items=max_items, num_workers=num_workers)
    return {"checkpoint": str(checkpoint), "data": str(spec), "split": split, "input_size": list(size), **result}
