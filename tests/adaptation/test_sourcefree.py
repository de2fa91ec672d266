"""The source-free driver and `vss adapt` end to end on a short generated clip (tiny model, CPU)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from adaptation import synth
from adaptation.clips import PairSampler, prepare_clip
from adaptation.methods.supervised import SourceOnly
from adaptation.sourcefree import AdaptConfig, adapt
from adaptation.trainer import Cancelled, TrainConfig, train
from models.accel import build_model
from models.checkpoint import load_checkpoint, make_meta, save_checkpoint
from models.classes import palette_for
from models.config import get_config
from service.commands import adapt as adapt_command
from service.video import VideoWriter

SIZE = (64, 128)


@pytest.fixture(scope="module")
def clip() -> synth.Clip:
    # The parent's own domain (unseen seed): a few adaptation steps keep the tiny parent's behaviour, so
    # the gate's proxies pass; domain shift and accuracy are bench/adaptation.py's business.
    return synth.generate_clip("source", frames=10, size=SIZE, seed=7)


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory, clip):
    """A briefly trained mini-os8 parent (a random one is too fragile for the gate's proxies)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_config("mini-os8")
    model = build_model(cfg)
    source = [prepare_clip(c.frames, SIZE, flows=c.flow, labels=c.labels)
              for c in (synth.generate_clip("source", frames=4, size=SIZE, seed=s) for s in range(4))]
    train(model, SourceOnly(head_lr_mult=1.0), PairSampler(source, batch_size=4, seed=0),
          TrainConfig(steps=40, lr=3e-3))
    model.eval()
    meta = make_meta(cfg, list(synth.CLASSES), palette_for(synth.CLASSES), SIZE, parent=None, source="test")
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "parent", model, meta)


@pytest.fixture(scope="module")
def video(tmp_path_factory, clip):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with VideoWriter(path, 15.0, SIZE[1], SIZE[0], crf=18) as w:
        for frame in clip.frames:
            w.write(frame)
    return path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vss")
    adapt_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["adapt", *argv])
    return int(args.func(args) or 0)


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


def test_vss_adapt_writes_checkpoint_with_meta(parent_dir, video, tmp_path, capsys):
    out = tmp_path / "adapted"
    code = run_cli(["--method", "stpl", "--video", str(video), "--checkpoint", str(parent_dir), "-o", str(out),
                    "--steps", "3", "--lr", "1e-5", "--seed", "0", "--option", "max_pixels=256", "--quiet"])
    assert code == 0, capsys.readouterr().err
    model, meta = load_checkpoint(out)
    prov = meta["provenance"]
    assert meta["parent"] == str(parent_dir.resolve())
    assert prov["method"] == "stpl" and prov["hyperparameters"]["lr"] == 1e-5
    assert prov["hyperparameters"]["options"]["max_pixels"] == 256
    assert prov["inputs"][0]["path"] == "clip.mp4" and len(prov["inputs"][0]["sha256"]) == 64
    assert prov["gate"]["passed"] is True and "agreement" in prov["gate"]["metrics"]
    assert meta["classes"] == list(synth.CLASSES) and meta["input_size"] == list(SIZE)
    assert not any(k.startswith(("heads", "projection")) for k in model.state_dict())  # STPL heads discarded
    json.dumps(meta)


def test_vss_adapt_sabotaged_run_is_rejected(parent_dir, video, tmp_path, capsys):
    out = tmp_path / "bad"
    code = run_cli(["--method", "tent", "--video", str(video), "--checkpoint", str(parent_dir), "-o", str(out),
                    "--steps", "4", "--lr", "1e3", "--quiet"])
    err = capsys.readouterr().err
    assert code == adapt_command.EXIT_REJECTED
    assert "rejected" in err and "  - " in err
    assert not out.exists()


def test_vss_adapt_user_errors(parent_dir, video, tmp_path):
    from service.cli import CLIError

    with pytest.raises(CLIError, match="video not found"):
        run_cli(["--video", str(tmp_path / "missing.mp4"), "--checkpoint", str(parent_dir), "-o", str(tmp_path / "o")])
    with pytest.raises(CLIError, match="go together"):
        run_cli(["--video", str(video), "--checkpoint", str(parent_dir), "-o", str(tmp_path / "o"),
                 "--val-video", str(video)])
    with pytest.raises(CLIError, match="KEY=VALUE"):
        run_cli(["--video", str(video), "--checkpoint", str(parent_dir), "-o", str(tmp_path / "o"), "--option", "x"])


def _labels_as_the_cli_sees_them(model, video, n, directory):
    """Write ``model``'s predictions on ``video`` (decoded and flowed as `vss adapt` does) as label PNGs."""
    from PIL import Image

    from models.flow import build_flow
    from models.stream import predict_stream

    frames = adapt_command.read_video(str(video), n, 1)
    clip = prepare_clip(frames, SIZE, flow_provider=build_flow("dis"))
    pred = predict_stream(model, clip.frames, clip.flows)
    assert (pred >= 0).all()
    directory.mkdir()
    for t, lab in enumerate(pred.astype(np.uint8)):
        Image.fromarray(lab).save(directory / f"{t:04d}.png")
    return directory


def test_vss_adapt_labeled_validation(parent_dir, video, clip, tmp_path):
    """With labels the gate decides on mIoU alone: labels that are the parent's own predictions reject
    any change; labels that are the candidate's predictions accept it (the run is deterministic)."""
    n = len(clip.frames)
    base = ["--method", "bn", "--video", str(video), "--checkpoint", str(parent_dir), "--steps", "2", "--quiet"]
    parent, _ = load_checkpoint(parent_dir)
    parents_view = _labels_as_the_cli_sees_them(parent, video, n, tmp_path / "parent_labels")
    rejected = tmp_path / "rejected"
    code = run_cli([*base, "-o", str(rejected), "--val-video", str(video), "--val-labels", str(parents_view)])
    assert code == adapt_command.EXIT_REJECTED and not rejected.exists()

    unlabeled = tmp_path / "unlabeled"
    assert run_cli([*base, "-o", str(unlabeled)]) == 0
    candidate, meta = load_checkpoint(unlabeled)
    assert "miou_candidate" not in meta["provenance"]["gate"]["metrics"]
    candidates_view = _labels_as_the_cli_sees_them(candidate, video, n, tmp_path / "candidate_labels")
    accepted = tmp_path / "accepted"
    code = run_cli([*base, "-o", str(accepted), "--val-video", str(video), "--val-labels", str(candidates_view)])
    assert code == 0
    metrics = load_checkpoint(accepted)[1]["provenance"]["gate"]["metrics"]
    assert metrics["miou_candidate"] == 100.0 and metrics["miou_parent"] < 100.0


def test_config_defaults_crop_parsing_and_budget():
    from adaptation.sourcefree import DEFAULTS, FULL_FRAME, Budget

    resolved = AdaptConfig(method="stpl", options={"fusion": "concat"}).resolved()
    assert resolved["lr"] == DEFAULTS["stpl"]["lr"] and resolved["options"]["fusion"] == "concat"
    assert resolved["crop"] == DEFAULTS["stpl"]["config"]["crop"]
    assert AdaptConfig(method="stpl", crop=FULL_FRAME, batch_size=1, lr=0.5).resolved()["batch_size"] == 1
    with pytest.raises(ValueError, match="unknown source-free method"):
        AdaptConfig(method="source-only").resolved()
    assert adapt_command.parse_crop("128x256") == (128, 256) and adapt_command.parse_crop("full") == FULL_FRAME
    from service.cli import CLIError

    with pytest.raises(CLIError, match="HxW"):
        adapt_command.parse_crop("big")
    budget = Budget(1e9, "cpu")
    assert budget.left() > 0 and budget.spent() >= 0
    assert Budget(None).left() is None
    with pytest.raises(ValueError, match="clock"):
        Budget(1.0, "gpu")
