"""predict_stream: one forward per frame equals the pairwise ACCEL forward; an engine gives the same labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.accel import build_model
from models.config import get_config, parse_hxw
from models.stream import predict_stream


def _clip(frames: int = 3, h: int = 32, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    imgs = (rng.random((frames, h, w, 3)) * 255).astype(np.uint8)
    flows = np.zeros((frames, h, w, 2), np.float32)
    flows[1:, ..., 0] = 1.5
    return imgs, flows


def _labels(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True).argmax(1)[0].numpy()


def test_stream_equals_pairwise_forward_with_flow() -> None:
    torch.manual_seed(0)
    model = build_model(get_config("mini-os8")).eval()
    with torch.no_grad():  # the fusion is the identity at init: make t-1 and the flow matter
        for p in model.fusion.parameters():
            p.normal_(0.0, 0.5)
    imgs, flows = _clip()
    pred = predict_stream(model, imgs, flows)
    assert pred.shape == imgs.shape[:3] and pred.dtype == np.int64
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    f = torch.from_numpy(flows).permute(0, 3, 1, 2)
    with torch.inference_mode():
        first = model(x[:1], x[:1], None)["fused"]  # a keyframe is fused with itself, unwarped
        second = model(x[1:2], x[:1], f[1:2])["fused"]
    assert np.array_equal(pred[0], _labels(first, imgs.shape[1:3]))
    assert np.array_equal(pred[1], _labels(second, imgs.shape[1:3]))
    unwarped = predict_stream(model, imgs)  # no flow: fused unwarped, a different prediction
    assert np.array_equal(unwarped[0], pred[0]) and not np.array_equal(unwarped[1:], pred[1:])


def test_flow_fn_is_asked_for_every_pair_and_non_finite_logits_are_minus_one() -> None:
    torch.manual_seed(0)
    model = build_model(get_config("mini-os8")).eval()
    imgs, flows = _clip()
    asked: list[int] = []

    def flow_fn(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        asked.append(int(np.flatnonzero([np.array_equal(cur, f) for f in imgs])[0]))
        return flows[1]

    assert np.array_equal(predict_stream(model, imgs, flow_fn=flow_fn), predict_stream(model, imgs, flows))
    assert asked == [1, 2]
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    assert (predict_stream(model, imgs, flows) == -1).all()


def test_parse_hxw() -> None:
    assert parse_hxw("256x512") == (256, 512) and parse_hxw(" 8X16 ") == (8, 16)
    for bad in ("256", "axb", "256x", "1x2x3"):
        with pytest.raises(ValueError, match="expected HxW"):
            parse_hxw(bad)
    with pytest.raises(ValueError, match=r"out of range \(32\.\.4096 per side\)"):
        parse_hxw("16x64", min_side=32, max_side=4096)
