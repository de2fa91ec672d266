"""Model shapes for every preset, identity fusion at init, and streaming == clip forward."""

from __future__ import annotations

import math

import pytest
import torch

from models.accel import build_model
from models.config import CONFIGS, ModelConfig, get_config
from models.stream import ModuleStream, stream_step


def _frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logit_shapes_for_every_config(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg).eval()
    h, w = 65, 129  # the paper config maps 512x1024 to 65x129 logits; a small odd input is enough here
    with torch.inference_mode():
        out = model.frame(_frames(1, h, w), with_features=True)
    expected = (1, cfg.num_classes, math.ceil(h / cfg.output_stride), math.ceil(w / cfg.output_stride))
    assert tuple(out["main"].shape) == expected
    if cfg.aux_head:
        assert out["aux"].shape == out["main"].shape
    assert out["feat"].shape[-2:] == out["main"].shape[-2:]
    assert out["feat"].shape[1] == model.net.feature_channels
    c = cfg.num_classes
    assert tuple(model.fusion.conv.weight.shape) == (c, 2 * c, 1, 1)
    if name == "deeplabv2-r101":
        assert len(model.state_dict()) == 641  # as in the released DA-VSN / TPS checkpoints


def test_config_round_trips_through_a_dict() -> None:
    for cfg in CONFIGS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("resnet-9000")


@pytest.fixture(scope="module")
def mini() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_config("mini-os8")).eval()


def test_fusion_is_identity_on_the_current_frame_at_init(mini: torch.nn.Module) -> None:
    cur, prev = _frames(2, 64, 128, seed=1).split(1)
    flow = torch.randn(1, 2, 64, 128)
    with torch.no_grad():
        out = mini(cur, prev, flow)
    torch.testing.assert_close(out["fused"], out["cur"])
    torch.testing.assert_close(out["fused_aux"], out["cur_aux"])
    assert out["valid"].shape == (1, 1, 8, 16)


def test_stream_step_equals_forward_on_the_same_frames(mini: torch.nn.Module) -> None:
    model = build_model(get_config("mini-os8")).eval()
    model.load_state_dict(mini.state_dict())
    with torch.no_grad():  # a trained-looking fusion, so that the warped t-1 logits matter
        model.fusion.conv.weight.copy_(torch.randn_like(model.fusion.conv.weight) * 0.3)
    frames = _frames(3, 64, 128, seed=2)
    flows = torch.randn(3, 2, 64, 128) * 2
    stream = ModuleStream(model)
    with torch.no_grad():
        fused0, cached = stream_step(stream, frames[:1], None, None)
        torch.testing.assert_close(fused0, model.fusion(cached, cached))  # keyframe: fused with itself
        for t in (1, 2):
            fused, cur = stream_step(stream, frames[t:t + 1], cached, flows[t:t + 1])
            ref = model(frames[t:t + 1], frames[t - 1:t], flows[t:t + 1])
            torch.testing.assert_close(fused, ref["fused"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cur, ref["cur"])
            assert not torch.allclose(fused, cur)
            cached = cur


def test_previous_frame_gets_no_gradient(mini: torch.nn.Module) -> None:
    model = build_model(get_config("mini-os8")).train()
    cur, prev = _frames(2, 64, 128, seed=3).split(1)
    prev.requires_grad_(True)
    out = model(cur, prev, None)
    out["fused"].sum().backward()
    assert prev.grad is None
    assert model.fusion.conv.weight.grad is not None
