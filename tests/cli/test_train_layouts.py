"""`vss train` on the fabricated real-layout trees (VIPER -> Cityscapes-Seq), for every method, the result
imported into a service registry; and the same driver under the real `torchrun` launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from service.cli import main
from tests.adaptation.trees import make_cityscapes, make_viper

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--iters", "2", "--input-size", "64x128", "--config", "mini-os8", "--flow", "dis", "--no-progress",
        "--eval-items", "1", "--log-every", "1"]
METHODS = ("source-only", "davsn", "tps", "i2vda", "uvda")
SMALL_DISCRIMINATORS = {"davsn": ["--method-arg", "ndf=8"], "i2vda": ["--method-arg", "ndf=8"],
                        "uvda": ["--method-arg", "video_discriminator=true", "--method-arg", "ndf=8"]}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return make_viper(base), make_cityscapes(base)


@pytest.mark.parametrize("method", METHODS)
def test_train_viper_to_cityscapes_then_import(method: str, trees: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    viper, cityscapes = trees
    run = tmp_path / "run"
    code = main(["train", "--method", method, "--source", f"viper:{viper}", "--target",
                 f"cityscapes-seq:{cityscapes}", *TINY, *SMALL_DISCRIMINATORS.get(method, []), "-o", str(run)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    model, meta = load_checkpoint(run / "best")
    assert meta["provenance"]["method"] == method and len(meta["classes"]) == 15  # VIPER's label space
    assert model.num_classes == 15
    evals = [json.loads(line)["eval"] for line in (run / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and 0.0 <= evals[-1]["miou"] <= 100.0
    registry = tmp_path / "models"
    assert main(["models", "--model-dir", str(registry), "import", str(run / "best"), "--activate"]) == 0
    active = (registry / "ACTIVE").read_text().strip()
    assert (registry / active / "meta.json").is_file()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this interpreter")
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_cpu_processes(method: str, trees: tuple[Path, Path], tmp_path: Path) -> None:
    viper, cityscapes = trees
    run = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "service.cli", "train", "--method", method,
           "--source", f"viper:{viper}", "--target", f"cityscapes-seq:{cityscapes}", *TINY,
           *SMALL_DISCRIMINATORS.get(method, []), "--device", "cpu", "-o", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # rank 0 logs once per step
    assert (run / "best" / "meta.json").is_file() and json.loads((run / "state.json").read_text())["step"] == 2
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["davsn", "uvda"])
def test_amp_training_on_cuda(method: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "amp"
    code = main(["train", "--method", method, "--source", "synthetic:source", "--target", "synthetic:fog",
                 "--iters", "3", "--input-size", "64x128", "--no-progress", "--eval-items", "1", "--log-every", "1",
                 "--data-arg", "clips=1", "--data-arg", "frames_per_clip=5", "--amp", "--device", "cuda",
                 *SMALL_DISCRIMINATORS[method], "-o", str(run)])
    assert code == 0, capsys.readouterr().err
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(abs(v) < 1e6 for v in losses)
    assert load_checkpoint(run / "best")[1]["provenance"]["method"] == method
