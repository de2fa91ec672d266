"""CUDA paths that the CPU suite cannot reach: the fp16 torch engine, ONNX Runtime's CUDA provider,
batching across streams on CUDA, an STPL adaptation on CUDA, and bench/gpu.py itself. All `gpu`-marked:
they skip without CUDA (tests/conftest.py) and run with ``pytest -m gpu`` or ``make gpu-check``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.checkpoint import load_checkpoint
from service.engine import TorchEngine
from service.stream_segmenter import StreamSegmenter
from tests.service.test_batcher import ShiftFlow, batched, clip, unbatched

pytestmark = pytest.mark.gpu
# fp16 / TF32 / another library: the same argmax label on at least this share of pixels. The tiny checkpoint
# is random init: on 1 % of its pixels the top two logits are within 0.2 % of the largest logit.
AGREE = 0.97


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def frames_nchw(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, 64, 128)).astype(np.float32)


def test_fp16_torch_engine_matches_fp32_on_the_cpu(tiny_checkpoint: Path) -> None:
    model, meta = load_checkpoint(tiny_checkpoint)
    ref = TorchEngine(copy.deepcopy(model), meta, "fp32", "cpu")
    half = TorchEngine(copy.deepcopy(model), meta, "fp16", "cuda", half=True)
    assert half.half and next(half.model.parameters()).is_cuda
    x = frames_nchw(3)
    on_device = half.frame_logits(x)
    assert on_device.is_cuda and on_device.dtype == torch.float16  # the logits stay on the GPU until fuse
    got = on_device.float().cpu().numpy()
    assert np.isfinite(got).all()
    want = ref.frame_logits(x).numpy()
    assert agreement(got, want) >= AGREE
    np.testing.assert_allclose(got, want, rtol=0.02, atol=0.02 * np.abs(want).max())
    flow = np.full((3, 2, 64, 128), 1.5, np.float32)
    fused = half.fuse(on_device, on_device.flip(0), flow)
    assert fused.dtype == np.float32 and agreement(fused, ref.fuse(got, got[::-1].copy(), flow)) >= AGREE
    stream = clip(4, seed=1, h=64, w=128)
    for a, b in zip(unbatched(ref, stream), unbatched(half, stream)):
        assert (a.logits.argmax(0) == b.logits.argmax(0)).mean() >= AGREE


def test_onnx_runtime_cuda_provider_runs_batches_and_fusion(tiny_checkpoint: Path, tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    from models.onnx_export import export_onnx
    from service.onnx_engine import OnnxEngine

    model, meta = load_checkpoint(tiny_checkpoint)
    export_onnx(model, tmp_path, tuple(meta["input_size"]), meta["sha256"])
    engine = OnnxEngine(tmp_path, meta, "o", device="cuda", tensorrt=False)
    assert engine.providers[0] == "CUDAExecutionProvider" and engine.device == "cuda"
    ref = TorchEngine(model, meta, "t", "cpu")
    x = frames_nchw(4, seed=2)  # a batch of 4, as the batcher sends
    logits, want = engine.frame_logits(x), ref.frame_logits(x).numpy()
    assert logits.shape == want.shape and agreement(logits, want) >= AGREE
    flow = np.full((4, 2, 64, 128), -2.0, np.float32)
    assert agreement(engine.fuse(logits, logits[::-1].copy(), flow), ref.fuse(logits, logits[::-1].copy(), flow)) \
        >= AGREE


def test_batching_on_cuda_matches_unbatched(tiny_checkpoint: Path) -> None:
    from service.batcher import Batcher

    model, meta = load_checkpoint(tiny_checkpoint)
    for half in (False, True):
        engine = TorchEngine(copy.deepcopy(model), meta, "v1", "cuda", half=half)
        streams = [clip(4, seed=50 + k, h=64, w=128) for k in range(4)]
        batcher = Batcher(max_batch=4, max_wait_s=3600.0)
        results = batched(batcher, engine, streams)
        assert batcher.stats.largest == 4 and batcher.stats.batches == 4
        for k, stream in enumerate(streams):
            for got, want in zip(results[k], unbatched(engine, stream)):
                assert got.index == want.index and got.keyframe == want.keyframe
                assert (got.logits.argmax(0) == want.logits.argmax(0)).mean() >= AGREE
                np.testing.assert_allclose(got.logits, want.logits, rtol=0.02, atol=0.02 * np.abs(want.logits).max())


def test_stpl_adaptation_on_cuda(tiny_checkpoint: Path) -> None:
    from adaptation.clips import TargetClip
    from adaptation.sourcefree import AdaptConfig, adapt
    from adaptation.synth import generate_clip

    model, meta = load_checkpoint(tiny_checkpoint)
    clips = [generate_clip("fog", frames=6, size=(64, 128), seed=s) for s in range(3)]
    targets = [TargetClip(c.frames, c.flow.astype(np.float32)) for c in clips]
    cfg = AdaptConfig(method="stpl", steps=3, crop=(32, 64), batch_size=2, prepass_frames=8)
    result = adapt(model, meta, targets[:2], cfg, heldout=targets[2:], device="cuda")
    assert next(result.model.parameters()).is_cuda
    assert result.train is not None and result.train.steps == 3
    assert all(math.isfinite(h["loss"]) for h in result.train.history)
    engine = TorchEngine(result.model, result.meta, "adapted", "cuda")
    labels = StreamSegmenter(engine, ShiftFlow()).step(clips[0].frames[0]).labels
    assert labels.shape == (64, 128) and labels.max() < len(meta["classes"])


def test_gpu_check_script_tiny_run_on_cuda(tmp_path: Path) -> None:
    from bench.gpu import main

    out = tmp_path / "report.json"
    assert main(["--tiny", "--no-tests", "--threads", "2", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    engines = report["models"]["demo"]["engines"]
    expected = {"torch-fp32", "torch-fp16"} | ({"onnx-cuda"} if "CUDAExecutionProvider" in ort.get_available_providers()
                                               else set())
    assert expected <= set(engines)
    for variant, part in engines.items():
        assert "error" not in part and part["device_used_mib"] > 0, (variant, part)
        assert part["peak_gpu_mib"] > 0 or variant.startswith("onnx")  # torch's allocator does not see ORT
    assert report["models"]["demo"]["stpl"]["peak_gpu_mib"] > 0
    assert report["environment"]["gpu"]
