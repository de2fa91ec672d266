"""The source-free driver end to end on a short generated clip (tiny model, CPU); `vss adapt` is
tests/cli/test_adapt_command.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptation import synth
from adaptation.clips import prepare_clip
from adaptation.sourcefree import AdaptConfig, adapt
from adaptation.trainer import Cancelled
from models.checkpoint import load_checkpoint
from tests.adaptation.tiny_parent import SIZE, target_clip, trained_parent


@pytest.fixture(scope="module")
def clip() -> synth.Clip:
    return target_clip()


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_parent(tmp_path_factory.mktemp("ck") / "parent")


def test_adapt_api_records_meta_and_leaves_parent_untouched(parent_dir, clip):
    parent, meta = load_checkpoint(parent_dir)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    clips = [prepare_clip(clip.frames, SIZE, flows=clip.flow)]
    events = []
    result = adapt(parent, meta, clips, AdaptConfig(method="itcr", steps=2, seed=1, chunk=5), parent_ref="p0",
                   on_progress=lambda stage, info: events.append(stage))
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items())
    assert events[0] == "bn_prepass" and events[-1] == "done"
    m = result.meta
    assert m["parent"] == "p0" and m["provenance"]["method"] == "itcr"
    assert m["provenance"]["hyperparameters"]["steps"] == 2 and len(m["provenance"]["data_sha256"]) == 64
    assert m["provenance"]["train"]["steps"] == 2
    assert m["provenance"]["gate"]["passed"] == result.report.passed
    assert m["provenance"]["data"]["heldout_frames"] == 5


def test_bn_post_pass_runs_after_training_within_the_budget(parent_dir, clip):
    parent, meta = load_checkpoint(parent_dir)
    clips = [prepare_clip(clip.frames, SIZE, flows=clip.flow)]
    events = []
    cfg = AdaptConfig(method="tent", steps=10**6, time_budget_s=3.0, budget_clock="cpu", bn_postpass=True, chunk=5)
    result = adapt(parent, meta, clips, cfg, on_progress=lambda stage, info: events.append(stage))
    assert events.index("bn_prepass") < events.index("train") < events.index("bn_postpass") < events.index("gate")
    assert result.train is not None and result.train.steps >= 1
    assert result.meta["provenance"]["hyperparameters"]["bn_postpass"] is True


def test_adapt_cancelled(parent_dir, clip):
    parent, meta = load_checkpoint(parent_dir)
    clips = [prepare_clip(clip.frames, SIZE, flows=clip.flow)]
    with pytest.raises(Cancelled):
        adapt(parent, meta, clips, AdaptConfig(method="tent", steps=5), should_stop=lambda: True)


def test_config_defaults_and_budget():
    from adaptation.sourcefree import DEFAULTS, Budget

    resolved = AdaptConfig(method="stpl", options={"fusion": "concat"}).resolved()
    assert resolved["lr"] == DEFAULTS["stpl"]["lr"] and resolved["options"]["fusion"] == "concat"
    assert resolved["crop"] == DEFAULTS["stpl"]["config"]["crop"]
    full = AdaptConfig(method="stpl", crop="full", batch_size=1, lr=0.5).resolved()
    assert full["batch_size"] == 1 and full["crop"] is None  # None after resolving: whole frames
    with pytest.raises(ValueError, match="unknown source-free method"):
        AdaptConfig(method="source-only").resolved()
    budget = Budget(1e9, "cpu")
    assert budget.left() > 0 and budget.spent() >= 0
    assert Budget(None).left() is None
    with pytest.raises(ValueError, match="clock"):
        Budget(1.0, "gpu")
