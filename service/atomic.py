"""Atomic file writes for the service's own files (job records, buffered clips), without importing torch.

``models.checkpoint.write_atomic`` does the same for checkpoints, but importing ``models`` loads torch,
which the idle worker process and the job store avoid.
"""

from __future__ import annotations

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
