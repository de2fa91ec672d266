"""models.atomic: every writer's temp-beside-and-rename, and the directory lock, across processes."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest

from models.atomic import (TEMP_PREFIX, locked, replacing, replacing_dir, staging_dir, write_atomic,
                           write_through)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_and_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert write_through(target, lambda f: f.write(b"12345")) == 5 and target.read_bytes() == b"12345"


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    write_atomic(target, b"old")

    def half(f) -> None:
        f.write(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_through(target, half)
    with pytest.raises(RuntimeError), replacing(target, ".part") as tmp:
        assert tmp.name.startswith(f"{TEMP_PREFIX}state.pt.") and tmp.name.endswith(".part")
        tmp.write_bytes(b"half")
        raise RuntimeError("exporter failed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_directory_is_published_whole_and_never_over_a_non_empty_one(tmp_path: Path) -> None:
    final = tmp_path / "labels"
    with replacing_dir(final) as tmp:
        assert tmp.name.startswith(".labels.tmp") and mode(tmp) == 0o755
        (tmp / "000000.png").write_bytes(b"png")
        assert not final.exists()  # nothing is visible before the block ends
    assert [p.name for p in final.iterdir()] == ["000000.png"]
    with pytest.raises(FileExistsError, match="non-empty"), replacing_dir(final) as tmp:
        (tmp / "000000.png").write_bytes(b"other")
    assert (final / "000000.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]  # the staging directory is gone
    empty = tmp_path / "empty"
    empty.mkdir()
    with replacing_dir(empty) as tmp:  # an empty directory may be replaced
        (tmp / "a").write_bytes(b"a")
    assert (empty / "a").is_file()
    assert staging_dir(tmp_path / "x").parent == tmp_path


def _add_under_lock(directory: str, rounds: int) -> None:
    counter = Path(directory) / "counter"
    for _ in range(rounds):
        with locked(Path(directory)):
            value = int(counter.read_text()) if counter.exists() else 0
            write_atomic(counter, str(value + 1).encode())  # a read-modify-write: loses updates without the lock


def test_the_directory_lock_serialises_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_add_under_lock, args=(str(tmp_path), 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "counter").read_text() == "150"
