"""ONNX export (both graphs, dynamic shapes) and the ONNX Runtime engine: parity with the torch engine."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.onnx_export import (DEFAULT_OPSET, FRAME_FILE, FUSION_FILE, MANIFEST_FILE, FusionGraph, _export,
                                export_onnx, is_current, read_manifest)
from service.cli import main as cli_main
from service.engine import TorchEngine
from service.engine_manager import EngineManager, EngineOptions, make_engine_factory
from service.onnx_engine import (OnnxEngine, OnnxEngineError, Provider, ensure_onnx, provider_name,
                                 select_providers)
from service.registry import ModelRegistry
from service.settings import Settings

PARITY = 0.995  # the product target: same argmax label on >= 99.5 % of pixels


@pytest.fixture(scope="module")
def model_and_meta(tiny_checkpoint: Path):
    torch.set_num_threads(1)
    model, meta = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():  # a fusion that really mixes in the warped logits (identity at init would hide the warp)
        gen = torch.Generator().manual_seed(0)
        model.fusion.conv.weight.add_(0.3 * torch.randn(model.fusion.conv.weight.shape, generator=gen))
    return model, meta


@pytest.fixture(scope="module")
def onnx_dir(model_and_meta, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Graphs from the default exporter, exported once for the module."""
    model, meta = model_and_meta
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out, tuple(meta["input_size"]), meta["sha256"])
    return out


def stream_agreement(torch_engine: TorchEngine, onnx_engine: OnnxEngine) -> tuple[float, float]:
    """Stream a generated clip through both engines (per-frame logits + fusion with the clip's exact flow);
    returns the worst per-frame argmax agreement and the worst relative error of the fused logits."""
    from adaptation.synth import generate_clip

    clip = generate_clip("fog", frames=6, size=(64, 128), seed=3)
    agreements, errors = [], []
    previous: dict[str, np.ndarray] = {}
    for t in range(len(clip.frames)):
        frame = clip.frames[t].transpose(2, 0, 1)[None].astype(np.float32)
        flow = clip.flow[t].transpose(2, 0, 1)[None].astype(np.float32)
        fused = {}
        for name, engine in (("torch", torch_engine), ("onnx", onnx_engine)):
            logits = engine.frame_logits(frame)
            fused[name] = engine.fuse(logits, previous.get(name, logits), flow if t else None)
            previous[name] = logits
        agreements.append((fused["torch"].argmax(1) == fused["onnx"].argmax(1)).mean())
        errors.append(np.abs(fused["torch"] - fused["onnx"]).max() / np.abs(fused["torch"]).max())
    return float(min(agreements)), float(max(errors))


def engines(model_and_meta, onnx_dir: Path) -> tuple[TorchEngine, OnnxEngine]:
    model, meta = model_and_meta
    return (TorchEngine(model, meta, "t", "cpu"),
            OnnxEngine(onnx_dir, meta, "o", device="cpu", intra_op_threads=1))


def check_graphs(onnx_dir: Path, exporter: str, sha: str) -> None:
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted([FRAME_FILE, FUSION_FILE, MANIFEST_FILE])
    manifest = read_manifest(onnx_dir)
    assert manifest["exporter"] == exporter and manifest["num_classes"] == 7 and manifest["output_stride"] == 8
    assert is_current(onnx_dir, sha) and not is_current(onnx_dir, "other")
    frame = onnx.load(str(onnx_dir / FRAME_FILE))
    assert frame.ir_version <= 10  # onnxruntime 1.31 rejects IR 14
    dims = frame.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3
    assert all(dims[i].dim_param for i in (0, 2, 3)), "batch, height and width must be dynamic"
    fusion = onnx.load(str(onnx_dir / FUSION_FILE))
    assert any(node.op_type == "GridSample" for node in fusion.graph.node)
    assert [i.name for i in fusion.graph.input] == ["current", "previous", "flow"]


def test_export_writes_self_contained_graphs_with_dynamic_axes(onnx_dir: Path, model_and_meta) -> None:
    check_graphs(onnx_dir, "legacy", model_and_meta[1]["sha256"])


def test_parity_with_torch_on_a_synthetic_clip(onnx_dir: Path, model_and_meta) -> None:
    agreement, error = stream_agreement(*engines(model_and_meta, onnx_dir))
    assert agreement >= PARITY and error < 1e-4, (agreement, error)


@pytest.mark.slow
def test_dynamo_exporter_fusion_graph(model_and_meta, tmp_path: Path) -> None:
    """The onnxscript exporter handles the fusion graph's shape arithmetic with dynamic sizes.

    Only this graph: the per-frame network is a plain convnet, and torch rebuilds the onnxscript op
    table on every export call (~5 s of CPU each). Verified by hand for the full model: max relative
    error 1e-6 (frame) and 7e-6 (fusion), identical argmax.
    """
    model, _ = model_and_meta
    path = tmp_path / FUSION_FILE
    gen = torch.Generator().manual_seed(2)
    example = (torch.randn(2, 7, 8, 16, generator=gen), torch.randn(2, 7, 8, 16, generator=gen),
               torch.randn(2, 2, 64, 128, generator=gen))
    small, big = {0: "N", 2: "h", 3: "w"}, {0: "N", 2: "H", 3: "W"}
    _export(FusionGraph(model.fusion), example, path, (["current", "previous", "flow"], ["fused"]),
            {"current": small, "previous": small, "flow": big, "fused": small}, "dynamo", DEFAULT_OPSET)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in ((1, 9, 17), (3, 32, 64)):
        cur, prev = torch.randn(n, 7, h, w, generator=gen), torch.randn(n, 7, h, w, generator=gen)
        flow = torch.randn(n, 2, 8 * h, 8 * w, generator=gen) * 4
        with torch.no_grad():
            expected, _ = model.fuse(cur, prev, flow)
        got = session.run(None, {"current": cur.numpy(), "previous": prev.numpy(), "flow": flow.numpy()})[0]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize(("n", "h", "w"), [(2, 64, 128), (1, 72, 136), (3, 40, 96)])
def test_dynamic_batch_and_size(onnx_dir: Path, model_and_meta, n: int, h: int, w: int) -> None:
    torch_engine, onnx_engine = engines(model_and_meta, onnx_dir)
    rng = np.random.default_rng(n * h)
    frames = rng.uniform(0, 255, (n, 3, h, w)).astype(np.float32)
    flow = rng.normal(0, 3, (n, 2, h, w)).astype(np.float32)
    ref, got = torch_engine.frame_logits(frames).numpy(), onnx_engine.frame_logits(frames)
    assert got.shape == ref.shape == (n, 7, -(-h // 8), -(-w // 8))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    previous = np.roll(ref, 1, axis=-1)
    fused_ref, fused = torch_engine.fuse(ref, previous, flow), onnx_engine.fuse(ref, previous, flow)
    np.testing.assert_allclose(fused, fused_ref, rtol=1e-4, atol=1e-4 * np.abs(fused_ref).max())


def test_fusion_graph_is_the_same_math_as_models_warp(model_and_meta) -> None:
    """The export-friendly module matches ``AccelSegmenter.fuse`` (resize + grid_sample + 1x1) in torch."""
    model, _ = model_and_meta
    gen = torch.Generator().manual_seed(1)
    cur, prev = torch.randn(2, 7, 9, 17, generator=gen), torch.randn(2, 7, 9, 17, generator=gen)
    flow = torch.randn(2, 2, 72, 136, generator=gen) * 5
    with torch.no_grad():
        expected, _ = model.fuse(cur, prev, flow)
        got = FusionGraph(model.fusion)(cur, prev, flow)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unwarped_fusion(onnx_dir: Path, model_and_meta) -> None:
    torch_engine, onnx_engine = engines(model_and_meta, onnx_dir)
    frames = np.random.default_rng(0).uniform(0, 255, (2, 3, 64, 128)).astype(np.float32)
    cur, prev = (torch_engine.frame_logits(f).numpy() for f in (frames[:1], frames[1:]))
    np.testing.assert_allclose(onnx_engine.fuse(cur, prev, None), torch_engine.fuse(cur, prev, None),
                               rtol=1e-4, atol=1e-4 * np.abs(cur).max())
    assert onnx_engine.backend == "onnxruntime" and onnx_engine.providers == ["CPUExecutionProvider"]


def test_engine_rejects_graphs_of_other_weights(onnx_dir: Path, model_and_meta) -> None:
    meta = {**model_and_meta[1], "sha256": "0" * 64}
    with pytest.raises(OnnxEngineError, match="other weights"):
        OnnxEngine(onnx_dir, meta)
    with pytest.raises(OnnxEngineError, match="missing ONNX graph"):
        OnnxEngine(onnx_dir / "nowhere", meta)


def test_cpu_providers_without_a_gpu_build() -> None:
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert select_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(OnnxEngineError, match="onnxruntime-gpu"):
            select_providers("cuda")


GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class GpuHostWithoutTensorRT:
    """Session factory of an onnxruntime-gpu host where TensorRT's library is missing and CUDA's too.

    A TensorRT session raises, as onnxruntime does when a provider library fails to load; every other
    request goes to the real onnxruntime, which (this being the CPU build) logs and silently runs the
    graph on the CPU provider, as onnxruntime-gpu does when the CUDA libraries are missing.
    """

    def __init__(self, broken: tuple[str, ...] = ("TensorrtExecutionProvider",)) -> None:
        self.broken, self.asked = broken, []

    def __call__(self, path: str, options: ort.SessionOptions, providers: list[Provider]) -> Any:
        wanted = provider_name(providers[0])
        self.asked.append(wanted)
        if wanted in self.broken:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : Failed to load {wanted}: libnvinfer.so.10: "
                               "cannot open shared object file: No such file or directory")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Specified provider ... is not in available providers"
            return ort.InferenceSession(path, options, providers=providers)


def test_provider_priority_for_a_gpu_build() -> None:
    trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": True})
    assert select_providers("auto", fp16=True, available=GPU_BUILD) == [trt, "CUDAExecutionProvider",
                                                                        "CPUExecutionProvider"]
    assert select_providers("auto", tensorrt=False, available=GPU_BUILD) == ["CUDAExecutionProvider",
                                                                             "CPUExecutionProvider"]
    assert select_providers("cuda", tensorrt=False, available=GPU_BUILD) == ["CUDAExecutionProvider"]
    assert select_providers("cpu", available=GPU_BUILD) == ["CPUExecutionProvider"]


def test_providers_fall_back_to_the_first_that_really_serves(onnx_dir: Path, model_and_meta,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    factory = GpuHostWithoutTensorRT()
    with caplog.at_level(logging.INFO, logger="service.onnx_engine"):
        engine = OnnxEngine(onnx_dir, model_and_meta[1], "v0007", device="auto", intra_op_threads=1,
                            session_factory=factory, available_providers=GPU_BUILD)
    # TensorRT raised on the first graph; CUDA created both sessions, which run on the CPU provider: kept.
    assert factory.asked == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CUDAExecutionProvider"]
    assert engine.provider == "CPUExecutionProvider" and engine.device == "cpu"
    assert len(engine.passed_over) == 2
    assert engine.passed_over[0].startswith("TensorrtExecutionProvider: ") and "libnvinfer" in engine.passed_over[0]
    assert engine.passed_over[1] == "CUDAExecutionProvider: onnxruntime fell back to CPUExecutionProvider"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "TensorrtExecutionProvider" in warned[0] and "CUDAExecutionProvider" in warned[1]
    assert any(r.getMessage() == "ONNX Runtime serves v0007 with CPUExecutionProvider" for r in caplog.records)
    torch_engine = TorchEngine(model_and_meta[0], model_and_meta[1], "t", "cpu")
    frames = np.random.default_rng(5).uniform(0, 255, (1, 3, 64, 128)).astype(np.float32)
    ref = torch_engine.frame_logits(frames).numpy()  # a CPU tensor, the engine's own form
    np.testing.assert_allclose(engine.frame_logits(frames), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_silent_fallback_is_seen_and_kept(onnx_dir: Path, model_and_meta) -> None:
    """onnxruntime-gpu without TensorRT's library: it logs and runs on the next provider that loads."""
    factory = GpuHostWithoutTensorRT(broken=())
    engine = OnnxEngine(onnx_dir, model_and_meta[1], session_factory=factory, available_providers=GPU_BUILD)
    assert factory.asked == ["TensorrtExecutionProvider", "TensorrtExecutionProvider"]  # no second try needed
    assert engine.provider == "CPUExecutionProvider" and engine.passed_over == [
        "TensorrtExecutionProvider: onnxruntime fell back to CPUExecutionProvider",
        "CUDAExecutionProvider: onnxruntime fell back to CPUExecutionProvider"]


def test_device_cuda_never_falls_back_to_the_cpu(onnx_dir: Path, model_and_meta) -> None:
    factory = GpuHostWithoutTensorRT()
    with pytest.raises(OnnxEngineError, match=r"device=cuda.*CUDAExecutionProvider: onnxruntime fell back to CPU"):
        OnnxEngine(onnx_dir, model_and_meta[1], device="cuda", session_factory=factory, available_providers=GPU_BUILD)
    assert "CPUExecutionProvider" not in factory.asked


def test_no_provider_that_serves_is_an_engine_error(onnx_dir: Path, model_and_meta) -> None:
    factory = GpuHostWithoutTensorRT(broken=tuple(GPU_BUILD))
    with pytest.raises(OnnxEngineError, match="no ONNX Runtime execution provider") as caught:
        OnnxEngine(onnx_dir, model_and_meta[1], session_factory=factory, available_providers=GPU_BUILD)
    assert all(name in str(caught.value) for name in GPU_BUILD)


@pytest.mark.parametrize(("engine", "provider"), [("onnx", "CPUExecutionProvider"), ("torch", "cpu")])
def test_the_serving_provider_is_exposed(start_client, tmp_path: Path, engine: str, provider: str) -> None:
    client = start_client(Settings(_env_file=None, model_dir=tmp_path / "models", buffer_dir=tmp_path / "buffer",
                                   cache_dir=tmp_path / "cache", job_dir=tmp_path / "jobs", demo_model=None,
                                   intra_op_threads=1, engine=engine, device="cpu"))
    active = client.get("/v1/models/active").json()
    assert active["version"] == "v0001" and active["provider"] == provider
    assert f'vss_model_provider{{provider="{provider}"}} 1.0' in client.get("/metrics").text


def test_registry_onnx_engine_exports_on_demand(tiny_checkpoint: Path, tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    version = reg.import_dir(tiny_checkpoint, activate=True)
    assert not reg.has_onnx(version)
    factory = make_engine_factory(EngineOptions("onnx", "cpu", intra_op_threads=1, cache_dir=tmp_path / "cache"))
    manager = EngineManager(reg, factory)
    assert manager.sync()
    engine = manager.current()
    assert engine.backend == "onnxruntime" and reg.has_onnx(version)
    stamp = (reg.path(version) / FRAME_FILE).stat().st_mtime_ns
    ensure_onnx(reg.path(version), reg.meta(version))
    assert (reg.path(version) / FRAME_FILE).stat().st_mtime_ns == stamp, "an up-to-date export was redone"
    again = reg.import_dir(reg.path(version))  # an import carries the graphs along
    assert reg.has_onnx(again)


def test_export_onnx_command(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    assert cli_main(["export-onnx", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "argmax agreement 100.0000%" in out
    assert is_current(checkpoint, load_checkpoint(checkpoint)[1]["sha256"])
    assert cli_main(["export-onnx", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_provider_parity(onnx_dir: Path, model_and_meta) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    model, meta = model_and_meta
    engine = OnnxEngine(onnx_dir, meta, device="cuda", tensorrt=False)
    frames = np.random.default_rng(0).uniform(0, 255, (1, 3, 64, 128)).astype(np.float32)
    ref = TorchEngine(model, meta, "t", "cpu").frame_logits(frames).numpy()
    assert (engine.frame_logits(frames).argmax(1) == ref.argmax(1)).mean() >= PARITY
