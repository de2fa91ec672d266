"""Checkpoint round trip and every refusal: wrong shapes, class counts, checksums, missing files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.accel import build_model
from models.checkpoint import CheckpointError, load_checkpoint, make_meta, read_meta, save_checkpoint
from models.classes import CLASS_SETS, palette_for
from models.config import get_config


@pytest.fixture()
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private, mutable copy of the tiny checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_round_trip_preserves_weights_and_meta(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cfg = get_config("mini-os8")
    model = build_model(cfg)
    names = list(CLASS_SETS["synthetic"])
    meta = make_meta(cfg, names, palette_for(names), (64, 128), parent="v0001", method="test")
    directory = save_checkpoint(tmp_path / "v0002", model, meta)
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    loaded, meta2 = load_checkpoint(directory)
    assert not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert meta2["classes"] == names and meta2["input_size"] == [64, 128] and meta2["parent"] == "v0001"
    assert meta2["provenance"]["method"] == "test" and len(meta2["sha256"]) == 64
    assert meta2["architecture"]["backbone"] == "resnet-mini"


def test_refuses_to_overwrite_a_checkpoint(ckpt: Path) -> None:
    model, meta = load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(ckpt, model, meta)


def test_make_meta_checks_class_count() -> None:
    with pytest.raises(CheckpointError, match="7 classes in the architecture but 3 names"):
        make_meta(get_config("mini-os8"), ["a", "b", "c"], [[0, 0, 0]] * 3, (64, 128))


def test_wrong_shapes_are_refused(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["architecture"]["num_classes"] = 5  # weights were saved for 7 classes
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit the architecture: .*shape mismatches"):
        load_checkpoint(ckpt)


def test_other_architecture_is_refused(ckpt: Path) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["architecture"]["aux_head"] = False
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(ckpt)


def test_unexpected_class_count_is_refused(ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint has 7 classes, expected 19"):
        load_checkpoint(ckpt, num_classes=19)


def test_corrupt_weights_fail_the_checksum(ckpt: Path) -> None:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(ckpt)


def test_unreadable_weights_are_refused_without_checksum(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_checkpoint(ckpt, verify=False)


def test_missing_files_are_named(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        load_checkpoint(ckpt)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        read_meta(ckpt.parent / "does-not-exist")


def test_invalid_meta_is_refused(ckpt: Path) -> None:
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid checkpoint metadata"):
        load_checkpoint(ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"architecture": {"backbone": "resnet-mini"}}))
    with pytest.raises(CheckpointError, match="invalid checkpoint metadata"):
        load_checkpoint(ckpt)
