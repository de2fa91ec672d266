"""Source statistics: computed from labeled frames, stored beside the weights, verified, carried by copies."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from adaptation import synth
from adaptation.source_stats import compute_source_stats
from models.checkpoint import (CheckpointError, checkpoint_files, load_checkpoint, load_source_stats, read_meta,
                               save_checkpoint)
from models.signature import LENGTH
from models.source_stats import STATS
from service.registry import ModelRegistry


@pytest.fixture(scope="module")
def labeled() -> tuple[list[np.ndarray], list[np.ndarray]]:
    clip = synth.generate_clip("source", 3, (64, 128), seed=7)
    return list(clip.frames), list(clip.labels)


@pytest.fixture()
def with_stats(tiny_checkpoint: Path, labeled: tuple[list, list], tmp_path: Path) -> Path:
    model, meta = load_checkpoint(tiny_checkpoint)
    model.source_stats = compute_source_stats(model, *labeled, provenance={"source": "test"})
    return save_checkpoint(tmp_path / "with-stats", model, meta)


def test_computed_stats_have_the_documented_shapes(tiny_checkpoint: Path, labeled: tuple[list, list]) -> None:
    model, _ = load_checkpoint(tiny_checkpoint)
    frames, labels = labeled
    stats = compute_source_stats(model, frames, labels)
    assert stats.layers == ("layer1", "layer2", "layer3", "layer4") and stats.frames == 3
    assert stats.feat_mean["layer4"].shape == (128, 4, 8) and (stats.feat_var["layer1"] >= 0).all()
    assert stats.prior.shape == (7, 16, 32)
    np.testing.assert_allclose(stats.prior.sum(0), 1.0, atol=1e-5)
    share = np.bincount(np.stack(labels).ravel(), minlength=7)[:7] / np.stack(labels).size
    np.testing.assert_allclose(stats.class_freq, share, atol=1e-6)
    assert stats.prototypes.shape == (7, 128) and stats.signature.shape == (LENGTH,)
    assert stats.prior[4, 0].mean() > stats.prior[4, -1].mean()  # sky is on top
    assert model.training is False


def test_round_trip_through_a_checkpoint(with_stats: Path, tiny_checkpoint: Path, labeled: tuple[list, list]) -> None:
    assert sorted(p.name for p in with_stats.iterdir()) == ["meta.json", "model.safetensors", STATS]
    assert checkpoint_files(with_stats) == ["model.safetensors", "meta.json", STATS]
    meta = read_meta(with_stats)
    assert meta["source_stats"]["file"] == STATS and len(meta["source_stats"]["sha256"]) == 64
    stats = load_source_stats(with_stats)
    model, _ = load_checkpoint(with_stats)
    assert stats is not None and model.source_stats is not None and stats.same_as(model.source_stats)
    again = compute_source_stats(load_checkpoint(tiny_checkpoint)[0], *labeled, provenance={"source": "test"})
    assert stats.same_as(again) and stats.provenance == {"source": "test"}
    # the weights and their checksum are those of the checkpoint the stats were added to
    assert meta["sha256"] == read_meta(tiny_checkpoint)["sha256"]


def test_old_checkpoints_have_none(tiny_checkpoint: Path) -> None:
    assert load_source_stats(tiny_checkpoint) is None
    assert load_checkpoint(tiny_checkpoint)[0].source_stats is None
    assert checkpoint_files(tiny_checkpoint) == ["model.safetensors", "meta.json"]


def test_modified_or_missing_stats_are_refused(with_stats: Path) -> None:
    data = bytearray((with_stats / STATS).read_bytes())
    data[-1] ^= 1
    (with_stats / STATS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_source_stats(with_stats)
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(with_stats)
    (with_stats / STATS).unlink()
    with pytest.raises(CheckpointError, match="missing source statistics"):
        load_checkpoint(with_stats)


def test_a_stats_entry_for_another_class_count_is_refused(with_stats: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(with_stats, tmp_path / "bad"))
    meta = json.loads((bad / "meta.json").read_text())
    meta["source_stats"] = {"file": "elsewhere.bin", "sha256": "0" * 64}
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="invalid source_stats entry"):
        load_source_stats(bad)


def test_copies_and_registry_versions_carry_the_stats(with_stats: Path, tmp_path: Path) -> None:
    """An adapted candidate (a deep copy of the parent) publishes with its parent's statistics."""
    model, meta = load_checkpoint(with_stats)
    candidate = copy.deepcopy(model)
    reg = ModelRegistry(tmp_path / "registry")
    v1 = reg.import_dir(with_stats, activate=True)
    v2 = reg.publish(candidate, {**meta, "source_stats": "stale"}, parent=v1)
    for version in (v1, v2):
        stats = load_source_stats(reg.path(version))
        assert stats is not None and stats.same_as(model.source_stats)
    # a model without statistics publishes without the file (and without a stale meta entry)
    candidate.source_stats = None
    v3 = reg.publish(candidate, read_meta(reg.path(v2)), parent=v2)
    assert load_source_stats(reg.path(v3)) is None and STATS not in checkpoint_files(reg.path(v3))


def test_make_demo_records_stats_and_stats_can_be_added_without_touching_weights(tiny_checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    from adaptation.make_demo import source_stats
    from models.checkpoint import add_source_stats

    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    weights = (ckpt / "model.safetensors").read_bytes()
    model, _ = load_checkpoint(ckpt)
    stats = source_stats(model, seeds=range(1000, 1001), frames=2)
    assert stats.provenance["source"] == "adaptation.make_demo" and stats.frames == 2
    meta = add_source_stats(ckpt, stats)
    assert (ckpt / "model.safetensors").read_bytes() == weights
    assert meta["sha256"] == read_meta(tiny_checkpoint)["sha256"] and read_meta(ckpt) == meta
    loaded = load_source_stats(ckpt)
    assert loaded is not None and loaded.same_as(stats)


def test_the_demo_model_carries_stats() -> None:
    from models.config import DEMO_MODEL_DIR

    stats = load_source_stats(DEMO_MODEL_DIR)
    assert stats is not None and stats.num_classes == 7 and stats.frames == 128
    assert (DEMO_MODEL_DIR / STATS).stat().st_size < 2_000_000


def test_import_davsn_reads_labeled_frames_from_npz_clips_and_specs(tmp_path: Path) -> None:
    from service.cli import CLIError
    from service.commands.import_davsn import labeled_source_frames

    clip = synth.generate_clip("source", 3, (32, 64), seed=1)
    np.savez(tmp_path / "a.npz", frames=clip.frames, labels=clip.labels)
    frames, labels = labeled_source_frames(str(tmp_path), (64, 128), list(synth.CLASSES), 2)
    assert len(frames) == 2 and frames[0].shape == (64, 128, 3) and labels[0].shape == (64, 128)
    frames, labels = labeled_source_frames("synthetic:source", (64, 128), list(synth.CLASSES), 2)
    assert len(frames) == 2 and frames[0].dtype == np.uint8 and labels[0].max() < 7
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIError, match="no \\*.npz"):
        labeled_source_frames(str(tmp_path / "empty"), (64, 128), list(synth.CLASSES), 2)
