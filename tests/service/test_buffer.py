"""The on-disk clip buffer: atomic clips, limits and eviction, the held-out split, several writers."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from service.buffer import ClipBuffer, ClipCollector, ClipDamaged, ClipNotFound, is_heldout
from tests.waiting import wait_until


def frames(n: int = 4, h: int = 32, w: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_add_load_roundtrip_and_resize(tmp_path: Path) -> None:
    buf = ClipBuffer(tmp_path)
    original = frames(3)
    info = buf.add(original, "stream")
    assert (info.frames, info.height, info.width, info.source) == (3, 32, 48, "stream")
    np.testing.assert_array_equal(buf.load(info.id), np.stack(original))
    small = buf.add(frames(2, 64, 128), "api", size=(16, 32))
    assert buf.load(small.id).shape == (2, 16, 32, 3)
    assert [c.id for c in buf.clips()] == [info.id, small.id]  # oldest first
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.name != ".lock") == [".json", ".json", ".npz", ".npz"]


def test_rejects_bad_clips(tmp_path: Path) -> None:
    buf = ClipBuffer(tmp_path)
    with pytest.raises(ValueError, match="at least 2"):
        buf.add(frames(1))
    with pytest.raises(ValueError, match="uint8"):
        buf.add([f.astype(np.float32) for f in frames(2)])
    with pytest.raises(ValueError, match="one size"):
        buf.add([frames(1, 8, 8)[0], frames(1, 8, 9)[0]])
    with pytest.raises(ClipNotFound):
        buf.load("../../etc/passwd")
    assert buf.clips() == []


def test_oldest_clips_are_evicted_by_count_and_bytes(tmp_path: Path) -> None:
    buf = ClipBuffer(tmp_path, max_clips=3)
    ids = [buf.add(frames(2, seed=i)).id for i in range(5)]
    assert [c.id for c in buf.clips()] == ids[2:]
    one = buf.clips()[0].bytes
    tight = ClipBuffer(tmp_path, max_clips=100, max_bytes=2 * one + one // 2)
    tight.evict()
    assert [c.id for c in tight.clips()] == ids[3:]
    with pytest.raises(ClipNotFound):
        buf.load(ids[0])
    stats = buf.stats()
    assert stats["clips"] == 2 and stats["oldest"]["id"] == ids[3] and stats["newest"]["id"] == ids[4]
    assert stats["bytes"] == sum(c.bytes for c in buf.clips())
    assert buf.clear() == 2 and buf.stats()["clips"] == 0 and buf.stats()["oldest"] is None


def test_heldout_split_is_a_deterministic_hash_of_the_frames(tmp_path: Path) -> None:
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    share = np.mean([is_heldout(d, 0.25) for d in digests])
    assert 0.2 < share < 0.3
    buf = ClipBuffer(tmp_path, heldout_fraction=0.5)
    infos = [buf.add(frames(2, seed=i)) for i in range(12)]
    assert all(c.heldout == is_heldout(c.sha256, 0.5) for c in infos)
    assert 0 < sum(c.heldout for c in infos) < 12
    again = [buf.add(frames(2, seed=i)) for i in range(12)]  # the same frames once more (a looping video)
    assert [c.heldout for c in again] == [c.heldout for c in infos]
    assert [c.id for c in again] == [c.id for c in infos]  # not stored twice
    stats = buf.stats()
    assert stats["heldout_clips"] + stats["train_clips"] == 12


def test_half_written_clips_are_invisible_and_orphans_removed(tmp_path: Path) -> None:
    buf = ClipBuffer(tmp_path)
    info = buf.add(frames(2))
    (tmp_path / f"{info.id}.json").unlink()  # a writer died between its two renames
    assert buf.clips() == []
    orphan = tmp_path / f"{info.id}.npz"
    old = time.time() - 3600
    import os

    os.utime(orphan, (old, old))
    buf.evict()
    assert not orphan.exists()


def test_damaged_clip_files_are_reported(tmp_path: Path) -> None:
    buf = ClipBuffer(tmp_path)
    info = buf.add(frames(2))
    (tmp_path / f"{info.id}.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ClipDamaged, match=info.id):
        buf.load(info.id)
    np.savez_compressed(tmp_path / f"{info.id}.npz", frames=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ClipDamaged, match="float32"):
        buf.load(info.id)


def _writer(root: str, seed: int, n: int) -> None:
    buf = ClipBuffer(root, max_clips=6)
    for i in range(n):
        buf.add(frames(2, 16, 16, seed=seed * 100 + i), f"w{seed}")


def test_several_writer_processes_share_one_bounded_buffer(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, 5)) for s in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    clips = ClipBuffer(tmp_path).clips()
    assert len(clips) == 6
    assert len({c.id for c in clips}) == 6
    for c in clips:
        assert ClipBuffer(tmp_path).load(c.id).shape == (2, 16, 16, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_collector_writes_in_the_background_and_drops_when_behind(tmp_path: Path) -> None:
    buf = ClipBuffer(tmp_path)
    added = []
    collector = ClipCollector(buf, lambda: (8, 12), queue_size=2, on_added=added.append)
    assert collector.submit(frames(3), "stream")
    assert collector.flush(30)
    assert [c.source for c in buf.clips()] == ["stream"] and buf.clips()[0].height == 8
    assert len(added) == 1
    skipping = ClipCollector(buf, lambda: None)  # no model loaded yet: nothing to size clips by
    skipping.submit(frames(2), "upload")
    assert skipping.flush(30) and len(buf.clips()) == 1 and skipping.dropped == 1
    collector.close()
    skipping.close()


def test_collector_never_blocks_the_caller(tmp_path: Path) -> None:
    import threading

    release = threading.Event()
    collector = ClipCollector(ClipBuffer(tmp_path), lambda: release.wait(30) and (8, 8), queue_size=1)
    assert collector.submit(frames(2, seed=1), "stream")
    wait_until(lambda: collector._queue.qsize() == 0, 10, "the writer to take the first clip", 0.01)
    assert collector.submit(frames(2, seed=2), "stream")  # waits in the queue
    assert not collector.submit(frames(2, seed=3), "stream")  # queue full: dropped at once
    assert collector.dropped == 1
    release.set()
    assert collector.flush(30)
    assert len(ClipBuffer(tmp_path).clips()) == 2
    collector.close()
