"""`vss train` end to end, resume from the last checkpoint, run-directory checks and `vss eval --data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adaptation.offline as offline
from adaptation.distributed import DistEnv, batch_indices, unwrap_model
from adaptation.offline import OfflineConfig, OfflineRun
from models.checkpoint import load_checkpoint
from service.cli import main

DATA = ["--data-arg", "clips=1", "--data-arg", "frames_per_clip=5"]
TINY = ["--input-size", "64x128", "--config", "mini-os8", "--no-progress", "--eval-items", "2", *DATA]


def test_vss_train_end_to_end_writes_a_loadable_best(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(["train", "--method", "tps", "--source", "synthetic:source", "--target", "synthetic:fog",
                 "--iters", "3", "--lr", "1e-3", "--eval-every", "2", "--log-every", "1", *TINY, "-o", str(run)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["best"]["step"] in (2, 3)
    model, meta = load_checkpoint(run / "best")
    assert meta["classes"][0] == "road" and meta["input_size"] == [64, 128]
    assert meta["provenance"]["method"] == "tps" and meta["provenance"]["target"] == "synthetic:fog"
    stats = model.source_stats  # recorded for source-free adaptation (srcstats) and routing
    assert stats is not None and stats.provenance["data"] == "synthetic:source" and stats.frames >= 1
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3] and "per_class" in evals[0]["eval"]
    assert {p.name for p in (run / "checkpoints").iterdir() if p.is_dir()} == {"step_0000002", "step_0000003"}
    state = json.loads((run / "state.json").read_text())
    assert state["last"] == "checkpoints/step_0000003" and state["step"] == 3
    # A finished run re-invoked with the same arguments has nothing left to do.
    assert main(["train", "--method", "tps", "--source", "synthetic:source", "--target", "synthetic:fog",
                 "--iters", "3", "--lr", "1e-3", "--eval-every", "2", *TINY, "-o", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 3


def test_vss_eval_data_reports_miou_and_tc(tmp_path: Path, tiny_checkpoint: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    code = main(["eval", "--data", "synthetic:fog", "--checkpoint", str(tiny_checkpoint), "--max-items", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class"]) == {"road", "sidewalk", "building", "vegetation", "sky", "person", "car"}
    assert 0 <= result["miou"] <= 100 and 0 <= result["tc"] <= 100 and result["items"] == 2


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", "davsn", "--source", "synthetic:source", *TINY, "-o", str(run)]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["train", "--method", "nope", "--source", "synthetic:source", *TINY, "-o", str(run)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["train", "--method", "tps", "--source", "viper:/no/such/dir", "--target", "synthetic:fog",
                 *TINY, "-o", str(tmp_path / "r2")]) == 2
    assert "/no/such/dir" in capsys.readouterr().err
    assert not run.exists()  # failed starts leave no run directory behind
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "tps"}))
    assert main(["train", "--method", "source-only", "--source", "synthetic:source", *TINY, "-o", str(run)]) == 2
    assert "another run" in capsys.readouterr().err


def test_batch_indices_resume_where_they_stopped() -> None:
    env = DistEnv()
    full = batch_indices(5, 2, 0, env)
    stream = [next(full) for _ in range(6)]
    resumed = batch_indices(5, 2, 0, env, start_step=3)
    assert [next(resumed) for _ in range(3)] == stream[3:]
    assert sorted(sum(stream[:2], []) + stream[2][:1]) == [0, 1, 2, 3, 4]  # one epoch, then the next


def _config(run_dir: Path, method: str, init: Path) -> OfflineConfig:
    args = {"davsn": {"ndf": 8}, "uvda": {"threshold": 0.0, "refine": "consistency"}}[method]
    return OfflineConfig(method=method, source="synthetic:source", target="synthetic:fog", run_dir=run_dir,
                         iters=4, lr=1e-2, input_size=(64, 128), init=str(init), ckpt_every=2, eval_items=1,
                         progress=False, device="cpu", method_args=args,
                         dataset_args={"clips": 1, "frames_per_clip": 5})


def _weights(run: OfflineRun) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in unwrap_model(run.model).state_dict().items()}
    for name, module in run.method.modules().items():
        state.update({f"{name}.{k}": v.clone() for k, v in module.state_dict().items()})
    return state


@pytest.mark.parametrize("method", ["davsn", "uvda"])
def test_resume_continues_exactly(method: str, tmp_path: Path, tiny_checkpoint: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    straight = OfflineRun(_config(tmp_path / "a", method, tiny_checkpoint))
    straight.run()
    expected = _weights(straight)

    original = OfflineRun._on_log

    def crash_at_3(self: OfflineRun, step: int, logs: dict) -> None:
        if step == 3:
            raise RuntimeError("simulated crash")
        original(self, step, logs)

    monkeypatch.setattr(OfflineRun, "_on_log", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        OfflineRun(_config(tmp_path / "b", method, tiny_checkpoint)).run()
    monkeypatch.setattr(OfflineRun, "_on_log", original)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 2
    resumed = OfflineRun(_config(tmp_path / "b", method, tiny_checkpoint))
    summary = resumed.run()
    assert summary["resumed_from"] == 2
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # The optimiser state came back too: momentum buffers exist right after the restore.
    assert all(len(s) > 0 for s in resumed.opt.state.values())
    assert offline.RUN_IDENTITY  # documented identity fields exist
    _, meta = load_checkpoint(tmp_path / "b" / "best")
    assert meta["provenance"]["step"] == 4
