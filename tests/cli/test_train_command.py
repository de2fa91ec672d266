"""`vss train` end to end on the synthetic benchmark (run directory, re-invocation, user errors) and
`vss eval --data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
