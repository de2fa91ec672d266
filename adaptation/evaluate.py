"""Dataset evaluation of an ACCEL model: mIoU per class and temporal consistency (TC).

Protocol (DA-VSN/TPS): frames k-2 (when the dataset has it), k-1 and k with their flows are streamed
through the model (``models.stream.stream_logits``: k fused with k-1, k-1 fused with k-2); the fused
main logits of k are upsampled (bilinear, align_corners=True) to the label size, argmax, one accumulated
confusion matrix, IoU per class, mIoU = mean over the classes present (minus the dataset's
``eval_exclude``, e.g. SYNTHIA's fence). TC (``tc``, ``adaptation.metrics.TemporalConsistency
.tc_pixel_agreement``): the prediction of frame k against the prediction of frame k-1 warped to k by
the flow, at the input resolution, as the share of warp-valid pixels that agree (UnifiedVideoDA's
``pred_pred`` / ESVS's TC).
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
from models.stream import ModuleStream, stream_logits

from .datasets import DataSpec, VideoFrameDataset, accepted_options, build_dataset, label_space_of, parse_spec
from .distributed import unwrap_model
from .metrics import TemporalConsistency, confusion_matrix, iou_from_confusion


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
    tc = TemporalConsistency()
    stream = ModuleStream(model)
    idx = subset_indices(len(dataset), max_items)
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, num_workers=num_workers)
    done = 0
    try:
        for batch in loader:
            b = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with_tc = "prev2" in b
            frames = [b["prev2"], b["prev"], b["cur"]] if with_tc else [b["prev"], b["cur"]]
            flows = [None, b["flow_prev"], b["flow"]] if with_tc else [None, b["flow"]]
            *_, prev_fused, fused = stream_logits(stream, frames, flows)
            label = batch["label"].numpy()
            pred = _up(fused, label.shape[-2:]).argmax(1).cpu().numpy()
            conf += confusion_matrix(pred, label, len(classes))
            if with_tc:
                size = tuple(b["cur"].shape[-2:])
                p_t = _up(fused, size).argmax(1).cpu().numpy()
                p_prev = _up(prev_fused, size).argmax(1).cpu().numpy()
                flow = b["flow"].permute(0, 2, 3, 1).cpu().numpy()
                for n in range(p_t.shape[0]):
                    tc.add(p_t[n], p_prev[n], flow[n])
            done += pred.shape[0]
            if on_batch is not None:
                on_batch(done, len(idx))
    finally:
        model.train(was_training)
    return summarize(conf, classes, dataset.eval_exclude, tc, done)


def summarize(conf: np.ndarray, classes: list[str], exclude: tuple[str, ...], tc: TemporalConsistency,
              items: int) -> dict[str, Any]:
    ious = iou_from_confusion(conf)
    tc_pixel = tc.tc_pixel_agreement()
    use = np.array([c not in exclude for c in classes]) & ~np.isnan(ious)
    return {
        "miou": round(float(ious[use].mean() * 100), 2) if use.any() else None,
        "per_class": {c: (round(float(v) * 100, 2) if not np.isnan(v) else None) for c, v in zip(classes, ious)},
        "excluded": list(exclude),
        "tc": None if tc_pixel is None else round(tc_pixel, 2),
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
