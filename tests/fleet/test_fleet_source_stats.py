"""Source statistics travel with a version through the object-store registry and are verified there."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptation import synth
from adaptation.source_stats import compute_source_stats
from models.checkpoint import load_checkpoint, load_source_stats, save_checkpoint
from models.source_stats import STATS
from service.storage import ObjectStore
from service.store_registry import MANIFEST, CorruptVersion, StoreRegistry


def test_stats_are_in_the_manifest_and_verified(store: ObjectStore, tmp_path: Path, tiny_checkpoint: Path) -> None:
    model, meta = load_checkpoint(tiny_checkpoint)
    clip = synth.generate_clip("source", 2, (64, 128), seed=3)
    model.source_stats = compute_source_stats(model, list(clip.frames), list(clip.labels))
    source = save_checkpoint(tmp_path / "ckpt", model, meta)
    reg = StoreRegistry(store, tmp_path / "cache-a")
    v1 = reg.import_dir(source, activate=True)
    v2 = reg.publish(load_checkpoint(source)[0], meta, parent=v1)
    for version in (v1, v2):
        assert STATS in reg.manifest(version)
    other = StoreRegistry(store, tmp_path / "cache-b")
    stats = load_source_stats(other.path(v2))
    assert stats is not None and stats.same_as(model.source_stats)
    # a stats file changed in the store after publishing is refused by the download's verification
    store.put(f"{v1}/{STATS}", b"not the published statistics")
    with pytest.raises(CorruptVersion, match=STATS):
        StoreRegistry(store, tmp_path / "cache-c").path(v1)
    assert MANIFEST not in reg.manifest(v1)
