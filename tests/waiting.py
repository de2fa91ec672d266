"""``wait_until``: poll a condition with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "the condition",
               interval: float = 0.05, give_up: Callable[[], str | None] | None = None) -> T:
    """Return the first truthy ``predicate()`` result; ``AssertionError`` naming ``what`` after ``timeout`` s.

    Exceptions raised by ``predicate`` count as "not yet" (the last one is reported on timeout).
    ``give_up`` is asked after every miss: a message from it (e.g. "the server process exited") ends the
    wait at once with that message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - a condition that cannot be evaluated yet is not met yet
            last_error = e
        reason = give_up() if give_up is not None else None
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)
