"""Warping and flow resizing: identity, exact integer shifts, gradients, and the generator's own flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.flow import resize_flow_np
from models.warp import resize_flow, warp


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_zero_flow_is_identity() -> None:
    x = _rand(2, 5, 9, 13)
    out, valid = warp(x, torch.zeros(2, 2, 9, 13))
    torch.testing.assert_close(out, x)
    assert valid.shape == (2, 1, 9, 13) and bool(valid.all())


@pytest.mark.parametrize("dx, dy", [(3, 0), (0, -2), (2, 1), (-4, 3)])
def test_integer_shift_is_an_exact_roll_on_the_interior(dx: int, dy: int) -> None:
    x = _rand(1, 3, 12, 16)
    flow = torch.zeros(1, 2, 12, 16)
    flow[:, 0], flow[:, 1] = dx, dy  # backward: pixel p of t shows p + (dx, dy) of t-1
    out, valid = warp(x, flow)
    rolled = torch.roll(x, shifts=(-dy, -dx), dims=(2, 3))
    inside = valid[0, 0].bool()
    assert inside.sum() == (12 - abs(dy)) * (16 - abs(dx))
    torch.testing.assert_close(out[..., inside], rolled[..., inside], rtol=0, atol=1e-5)


def test_gradients_reach_the_warped_input() -> None:
    x = _rand(1, 4, 8, 8).requires_grad_(True)
    flow = torch.full((1, 2, 8, 8), 0.5)
    out, _ = warp(x, flow)
    out.square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def test_flow_is_resized_to_the_input_grid() -> None:
    x = _rand(1, 2, 8, 16)
    flow = torch.zeros(1, 2, 32, 64)
    flow[:, 0] = 4 * (63 / 15)  # 4 px at the 8x16 grid, expressed at 32x64 (align-corners ratio)
    out, _ = warp(x, flow)
    torch.testing.assert_close(out[..., :12], x[..., 4:], rtol=0, atol=1e-4)


def test_resize_flow_scales_vectors_per_axis() -> None:
    flow = torch.zeros(1, 2, 16, 32)
    flow[:, 0], flow[:, 1] = 3.0, -2.0
    big = resize_flow(flow, (31, 63))
    assert big.shape == (1, 2, 31, 63)
    torch.testing.assert_close(big[:, 0], torch.full((1, 31, 63), 3.0 * 62 / 31))
    torch.testing.assert_close(big[:, 1], torch.full((1, 31, 63), -2.0 * 30 / 15))
    assert resize_flow(flow, (16, 32)) is flow


def test_numpy_and_torch_resizing_agree() -> None:
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(9, 17, 2)).astype(np.float32)
    small = resize_flow_np(flow, (5, 9))
    ref = resize_flow(torch.from_numpy(flow).permute(2, 0, 1)[None], (5, 9))[0].permute(1, 2, 0).numpy()
    assert small.shape == (5, 9, 2)
    # cv2 and torch interpolate at slightly different sample points; the vector scaling must match
    np.testing.assert_allclose(small.mean((0, 1)), ref.mean((0, 1)), atol=0.25)
    const = np.full((10, 20, 2), (1.0, 2.0), np.float32)
    np.testing.assert_allclose(resize_flow_np(const, (19, 39))[5, 5], (38 / 19, 2.0 * 18 / 9), rtol=1e-5)


def test_generator_flow_warps_labels_onto_the_next_frame() -> None:
    from adaptation.synth import generate_clip

    clip = generate_clip("source", frames=4, size=(64, 128), seed=3)
    for t in range(1, 4):
        prev = torch.from_numpy(clip.labels[t - 1]).float()[None, None]
        flow = torch.from_numpy(clip.flow[t]).permute(2, 0, 1)[None]
        warped, valid = warp(prev, flow, mode="nearest")
        ok = valid[0, 0].bool().numpy()
        agree = (warped[0, 0].numpy().astype(np.uint8) == clip.labels[t])[ok].mean()
        assert ok.mean() > 0.8
        assert agree > 0.97, f"frame {t}: only {agree:.3f} of the warped labels match"
