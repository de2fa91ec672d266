"""Atomic file and directory writes, and a cross-process directory lock: the one implementation.

Every writer in vss (checkpoints, ONNX files, run state, job records, buffered clips, outputs, synthetic
clips) writes a temp file or directory beside its target and renames it into place, so a reader sees the
old or the new content, never half of it, and a crash leaves at most a temp name behind.

Temp names: files ``.tmp-<name>.<random><suffix>`` (what the job store and the clip buffer sweep after a
crash), directories ``.<name>.tmp<random>`` (what the registry recognises beside its staging directory).
Published files are 0644 and directories 0755 (mkstemp/mkdtemp create private ones; outputs and
checkpoints are meant to be shared between containers and replicas).

Standard library only, no torch: ``models`` sits below ``adaptation`` and ``service``, so all three import
it, and the service's torch-free processes (the idle worker, the job store) too.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

FILE_MODE = 0o644
DIR_MODE = 0o755
TEMP_PREFIX = ".tmp-"


def temp_beside(path: Path, suffix: str = "") -> Path:
    """A new, empty file (mode 0644) in ``path``'s directory, named ``.tmp-<name>.<random><suffix>``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and rename it onto ``path`` (the commit of every file writer)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def replacing(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write by any means; on a normal exit it replaces ``path``,
    on an exception it is removed. For writers that need a file name (torch.save, an exporter)."""
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_through(path: Path, write: Callable[[BinaryIO], Any]) -> int:
    """Write through ``write(file)`` into a temp file beside ``path``, fsync, rename; returns the size."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        size = f.tell()
    return size


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (readers see the old or the new file, never half)."""
    write_through(path, lambda f: f.write(data))


def staging_dir(final: Path) -> Path:
    """A new, empty directory (mode 0755) beside ``final``, named ``.<name>.tmp<random>``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    tmp.chmod(DIR_MODE)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished staging directory onto ``final``; ``final`` may exist only as an empty directory
    (FileExistsError otherwise: what is published is never overwritten)."""
    if final.exists():
        if not final.is_dir() or any(final.iterdir()):
            raise FileExistsError(f"refusing to overwrite non-empty {final}")
        final.rmdir()
    os.replace(tmp, final)


@contextmanager
def replacing_dir(final: Path) -> Iterator[Path]:
    """Yield a staging directory for ``final``; on a normal exit it becomes ``final`` (``publish_dir``),
    on an exception it is removed with everything written into it."""
    tmp = staging_dir(final)
    try:
        yield tmp
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock(2) on ``directory/.lock`` (created with the directory) for the block:
    how processes sharing a directory serialise their read-modify-writes. Released on exit, or by the
    kernel when the holder dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
