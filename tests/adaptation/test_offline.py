"""The offline UDA driver: batch order across a resume, and a resumed run continuing exactly (`vss train` itself
is tests/cli/test_train_command.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adaptation.offline as offline
from adaptation.distributed import DistEnv, batch_indices, unwrap_model
from adaptation.offline import OfflineConfig, OfflineRun
from models.checkpoint import load_checkpoint


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
