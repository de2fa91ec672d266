"""Disk errors as answers: a full disk is 507, a read-only store 503 (``service.atomic.storage_problem``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from ..atomic import storage_problem
from ..deps import ApiError

log = logging.getLogger(__name__)


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` of a full or read-only disk inside the block into an ``ApiError``; other errors pass.
    The caller's own cleanup (``finally``) still runs: nothing partial may remain."""
    try:
        yield
    except OSError as e:
        problem = storage_problem(e, what)
        if problem is None:
            raise
        log.warning("%s failed: %s", what, e)  # the path is for the log, not for the client
        status, code, message = problem
        raise ApiError(status, code, message, {"Retry-After": "30"}) from e
