"""`vss adapt` end to end on a short generated clip (tiny model, CPU): the checkpoint it writes, a rejected
run, user errors, labelled validation and --crop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from adaptation import synth
from adaptation.clips import prepare_clip
from models.checkpoint import load_checkpoint
from service.commands import adapt as adapt_command
from tests.adaptation.tiny_parent import SIZE, clip_video, target_clip, trained_parent


@pytest.fixture(scope="module")
def clip() -> synth.Clip:
    return target_clip()


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_parent(tmp_path_factory.mktemp("ck") / "parent")


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, clip: synth.Clip) -> Path:
    return clip_video(tmp_path_factory.mktemp("video") / "clip.mp4", clip)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vss")
    adapt_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["adapt", *argv])
    return int(args.func(args) or 0)


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


def test_crop_parsing():
    from service.cli import CLIError

    assert adapt_command.parse_crop("128x256") == (128, 256) and adapt_command.parse_crop("full") == "full"
    with pytest.raises(CLIError, match="HxW"):
        adapt_command.parse_crop("big")
    with pytest.raises(CLIError, match="at least 8x8"):
        adapt_command.parse_crop("4x256")
