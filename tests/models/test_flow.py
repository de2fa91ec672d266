"""Flow providers: DIS direction, the trivial providers, and DA-VSN flow files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.flow import DISFlow, GroundTruthFlow, NoFlow, build_flow, load_davsn_flow, resize_flow_np


def textured(h: int = 96, w: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture that DIS can track."""
    rng = np.random.default_rng(seed)
    noise = cv2.resize(rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC)
    return np.clip(noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("preset", ["ultrafast", "fast", "medium"])
def test_dis_returns_backward_flow(preset: str) -> None:
    big = textured(128, 192)
    sx, sy = 3, -2  # the content moves by (+3, -2) px from t-1 to t
    prev = np.ascontiguousarray(big[16:112, 16:176])
    cur = np.ascontiguousarray(big[16 - sy:112 - sy, 16 - sx:176 - sx])
    flow = DISFlow(preset)(prev, cur)
    assert flow.shape == (96, 160, 2) and flow.dtype == np.float32
    # backward: pixel p of t was at p + flow(p) = p - (sx, sy) in t-1
    inner = flow[16:-16, 16:-16].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, axis=0), (-sx, -sy), atol=0.5)


def test_dis_rejects_unknown_presets() -> None:
    with pytest.raises(ValueError, match="unknown DIS preset"):
        DISFlow("warp-speed")


def test_no_flow_and_ground_truth() -> None:
    a = textured()
    assert NoFlow()(a, a) is None
    flows = np.zeros((3, 32, 64, 2), np.float32)
    flows[1, ..., 0], flows[2, ..., 1] = 1.0, 2.0
    gt = GroundTruthFlow(flows)
    small = np.zeros((16, 32, 3), np.uint8)
    first = gt(small, small)  # resized to the frames it is asked about, vectors scaled
    np.testing.assert_allclose(first[..., 0], 31 / 63, rtol=1e-5)
    np.testing.assert_allclose(gt(small, small)[..., 1], 2.0 * 15 / 31, rtol=1e-5)
    with pytest.raises(IndexError, match="exhausted"):
        gt(small, small)


def test_build_flow_names() -> None:
    assert build_flow("none").name == "none"
    assert build_flow("dis").name.startswith("dis-")
    assert build_flow("dis-medium").name == "dis-medium"
    with pytest.raises(ValueError, match="needs local RAFT weights"):
        build_flow("raft")
    with pytest.raises(ValueError, match="unknown flow provider"):
        build_flow("farneback")


def test_load_davsn_flow_decodes_int16_half_resolution(tmp_path: Path) -> None:
    half = np.zeros((32, 64, 2), np.float32)
    half[..., 0], half[..., 1] = 1.5, -0.7  # pixels at half resolution
    path = tmp_path / "000001.npy"
    np.save(path, np.rint(half * 10).astype(np.int16))
    raw = load_davsn_flow(path)
    np.testing.assert_allclose(raw[0, 0], (1.5, -0.7), atol=1e-6)
    full = load_davsn_flow(path, size=(64, 128))
    assert full.shape == (64, 128, 2) and full.dtype == np.float32
    np.testing.assert_allclose(full[10, 10], (1.5 * 127 / 63, -0.7 * 63 / 31), rtol=1e-5)
    np.save(path, np.rint(half * 10).astype(np.int16).transpose(2, 0, 1))  # channels-first files too
    np.testing.assert_allclose(load_davsn_flow(path, size=(64, 128)), full, rtol=1e-6)


def test_load_davsn_flow_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="flow file not found"):
        load_davsn_flow(tmp_path / "missing.npy")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 5, 3), np.int16))
    with pytest.raises(ValueError, match=r"expected an \(H, W, 2\) flow array"):
        load_davsn_flow(bad)


def test_resize_flow_np_identity_and_scale() -> None:
    flow = np.random.default_rng(0).normal(size=(8, 8, 2)).astype(np.float32)
    assert resize_flow_np(flow, (8, 8)) is flow
    const = np.ones((8, 16, 2), np.float32)
    np.testing.assert_allclose(resize_flow_np(const, (15, 31))[3, 3], (30 / 15, 14 / 7), rtol=1e-5)


def test_encode_davsn_flow_round_trips_through_load(tmp_path: Path) -> None:
    from models.flow import encode_davsn_flow

    flow = np.stack(np.meshgrid(np.linspace(-3, 3, 64), np.linspace(-2, 2, 32)), -1).astype(np.float32)
    encoded = encode_davsn_flow(flow)
    assert encoded.dtype == np.int16 and encoded.shape == (16, 32, 2)
    np.save(tmp_path / "f.npy", encoded)
    decoded = load_davsn_flow(tmp_path / "f.npy", size=(32, 64))
    assert np.abs(decoded - flow).max() < 0.2  # 0.1 px quantisation plus the half-resolution resize
