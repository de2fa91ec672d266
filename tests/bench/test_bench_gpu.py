"""bench/gpu.py on a machine without CUDA: the refusal, the ``--device cpu --tiny`` dry run (every part, real
measured values, the report's structure) and how the `gpu`-marked tests are run and counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.gpu import main, run_tests, summarize

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


def positive(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@no_cuda
def test_without_cuda_it_says_so_and_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.json"
    assert main(["-o", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_tiny_cpu_dry_run_measures_every_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gpu" / "report.json"
    assert main(["--device", "cpu", "--tiny", "--no-tests", "--threads", "1", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["environment"]["device"] == "cpu"
    assert report["tests"] == {"ok": True, "skipped": "--no-tests"}
    assert set(report["models"]) == {"demo", "mini-os8"}
    for name, model in report["models"].items():
        assert model["input_size"] == [64, 128]
        assert set(model["engines"]) == {"torch-fp32", "onnx-cpu"}
        for engine in model["engines"].values():
            assert all(positive(engine[k]) for k in ("network_ms", "stream_fps", "naive_fps", "speedup")), engine
            assert engine["peak_gpu_mib"] is None and engine["device_used_mib"] is None
        batching = model["batching"]
        assert batching["engine"] == "torch-fp32" and batching["max_batch"] == 8
        assert [r["streams"] for r in batching["rows"]] == [1, 4, 8]
        for row in batching["rows"]:
            for mode in ("unbatched", "batched"):
                r = row[mode]
                assert positive(r["fps"]) and 0 < r["p50_ms"] <= r["p99_ms"] and r["frames"] == 2 * row["streams"]
            assert row["unbatched"]["mean_batch"] == 1.0 and 1.0 <= row["batched"]["mean_batch"] <= row["streams"]
        assert positive(model["cpu_stages"]["flow_ms"]) and positive(model["cpu_stages"]["label_map_ms"])
        stpl = model["stpl"]
        assert positive(stpl["ms_per_step"]) and stpl["steps"] == 1 and math.isfinite(stpl["loss"])
    checks = report["checks"]
    r101_name, demo_name = "deeplabv2-r101 streaming 512x1024 fp16 frames/s", "demo model batched at 8 streams frames/s"
    assert set(checks) == {r101_name, demo_name}
    r101, demo = checks[r101_name], checks[demo_name]
    assert r101 == {"value": None, "target": 60.0, "passed": None}  # no r101 in a tiny run
    demo_fps = next(r["batched"]["fps"] for r in report["models"]["demo"]["batching"]["rows"] if r["streams"] == 8)
    assert demo == {"value": demo_fps, "target": 1000.0, "passed": demo_fps >= 1000.0}  # computed from the run
    assert positive(report["elapsed_s"]) and positive(report["peak_rss_mib"])
    printed = capsys.readouterr().out
    assert "| demo | torch-fp32 |" in printed and "| mini-os8 (torch-fp32) | 8 |" in printed
    assert f"report: {out}" in printed


@no_cuda
def test_gpu_marked_tests_are_run_and_counted() -> None:
    result = run_tests(["tests/service/test_gpu.py"], 300, "cpu")
    assert result["ok"] and result["returncode"] == 0, result
    assert result["skipped"] == 5 and result["passed"] == result["failed"] == 0


def test_a_gpu_test_run_is_ok_only_if_nothing_failed_and_on_cuda_something_ran() -> None:
    assert summarize(0, "..\n4 passed, 1 skipped in 3.2s\n", "", "cuda")["ok"]
    assert not summarize(0, "5 skipped in 0.1s\n", "", "cuda")["ok"]  # nothing ran on the GPU
    assert summarize(0, "5 skipped in 0.1s\n", "", "cpu")["ok"]
    failed = summarize(1, "F.\nFAILED tests/x.py::test_a - boom\n1 failed, 1 passed, 1 error in 2s\n", "", "cuda")
    assert not failed["ok"] and (failed["failed"], failed["passed"], failed["errors"]) == (1, 1, 1)
    assert failed["failures"] == ["FAILED tests/x.py::test_a - boom"]
    assert not summarize(5, "no tests ran in 0.1s\n", "", "cpu")["ok"]
