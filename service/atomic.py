"""What a full or read-only disk means for a client (``storage_problem``); and, re-exported for the service,
the atomic writers and the directory lock of ``models.atomic`` (the one implementation, torch-free, which
``models`` and ``adaptation`` use too).
"""

from __future__ import annotations

import errno

from models.atomic import TEMP_PREFIX, locked, publish, replacing, temp_beside, write_atomic, write_through

__all__ = ["TEMP_PREFIX", "locked", "publish", "replacing", "storage_problem", "temp_beside", "write_atomic",
           "write_through"]

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
