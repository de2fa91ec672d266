"""Atomic file writes for the service's own files (job records, buffered clips), without importing torch;
and what a full or read-only disk means for a client (``storage_problem``).

``models.checkpoint.write_atomic`` does the same for checkpoints, but importing ``models`` loads torch,
which the idle worker process and the job store avoid.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_through(path: Path, write: Callable[[BinaryIO], Any]) -> int:
    """Write through ``write(file)`` into a temp file next to ``path``, fsync, rename; returns the size."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (readers see the old or the new file, never half)."""
    write_through(path, lambda f: f.write(data))


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_problem(error: BaseException, what: str = "the request") -> tuple[int, str, str] | None:
    """``(status, code, message)`` for an error of a full disk (507) or a read-only store (503); None for
    any other error. The message says what failed, never a path."""
    if not isinstance(error, OSError):
        return None
    if error.errno in FULL_ERRNOS:
        return 507, "insufficient_storage", (f"the server's disk is full: {what} failed and nothing of it was "
                                             "kept; retry when space was freed")
    if error.errno in READ_ONLY_ERRNOS:
        return 503, "storage_read_only", (f"the server's storage is read-only: {what} failed and nothing "
                                          "changed; retry when it is writable again")
    return None
