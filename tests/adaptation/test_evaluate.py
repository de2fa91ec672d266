"""Dataset evaluation scores what the one stream step predicts; the two temporal-consistency metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptation.datasets import build_dataset
from adaptation.evaluate import evaluate, summarize
from adaptation.metrics import TemporalConsistency, confusion_matrix
from models.accel import build_model
from models.config import get_config
from models.stream import predict_stream

SIZE = (64, 128)


def test_evaluate_scores_the_streamed_prediction_of_each_item() -> None:
    torch.manual_seed(0)
    model = build_model(get_config("mini-os8")).eval()
    with torch.no_grad():  # the fusion is the identity at init: make t-1 and the flow matter
        model.fusion.conv.weight.normal_(0.0, 0.5)
    dataset = build_dataset("synthetic:fog", "val", input_size=SIZE, extras=("prev2",), clips=1, frames_per_clip=5)
    result = evaluate(model, dataset)
    classes = list(dataset.classes)
    conf, tc = np.zeros((len(classes), len(classes)), np.int64), TemporalConsistency()
    for i in range(len(dataset)):
        item = dataset[i]  # frames k-2, k-1, k as one three-frame clip, streamed
        frames = np.stack([item[k].permute(1, 2, 0).numpy() for k in ("prev2", "prev", "cur")])
        flows = np.stack([np.zeros((*SIZE, 2), np.float32)]
                         + [item[k].permute(1, 2, 0).numpy() for k in ("flow_prev", "flow")])
        pred = predict_stream(model, frames, flows)
        conf += confusion_matrix(pred[2], item["label"].numpy(), len(classes))
        tc.add(pred[2], pred[1], flows[2])
    assert result == summarize(conf, classes, dataset.eval_exclude, tc, len(dataset))
    assert result["tc"] is not None and result["items"] == len(dataset) == 2


def test_temporal_consistency_metrics() -> None:
    prev = np.tile(np.arange(8) // 2, (4, 1))  # vertical stripes of classes 0..3
    moved = np.roll(prev, 1, axis=1)  # everything moved one pixel right ...
    flow = np.zeros((4, 8, 2), np.float32)
    flow[..., 0] = -1.0  # ... so pixel x of t shows what was at x - 1 in t-1
    tc = TemporalConsistency(num_classes=4)
    tc.add(moved, prev, flow)
    assert (tc.agree, tc.valid) == (28, 28)  # column 0 looks outside the frame
    assert tc.tc_pixel_agreement() == 100.0 and tc.tc_class_iou() == 100.0
    flicker = TemporalConsistency(num_classes=2).add_clip(
        np.stack([np.zeros((4, 8), np.int64), np.repeat([[0] * 4 + [1] * 4], 4, axis=0)]),
        np.zeros((2, 4, 8, 2), np.float32))
    assert flicker.tc_pixel_agreement() == 50.0
    assert flicker.tc_class_iou() == 25.0  # class 0: IoU 1/2, class 1: 0
    assert TemporalConsistency().tc_pixel_agreement() is None  # no pair, no valid pixel
    with pytest.raises(ValueError, match="needs TemporalConsistency\\(num_classes\\)"):
        TemporalConsistency().tc_class_iou()
