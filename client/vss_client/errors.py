"""Exceptions of the client. Every one derives from ``VSSError``."""

from __future__ import annotations

from typing import Any


class VSSError(Exception):
    """Base class of every error this package raises."""


class ServerUnreachable(VSSError):
    """The server could not be reached (refused connection, DNS failure, timeout)."""


class APIError(VSSError):
    """The server answered with an error status; carries its JSON error body.

    ``status`` is the HTTP status, ``code`` the machine-readable error code (e.g. ``"video_too_long"``),
    ``message`` the server's explanation, ``request_id`` the id to quote when asking about the request
    (also in the server's logs), ``details`` any further fields of the error object.
    """

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        self.status, self.code, self.message = status, code, message
        self.request_id = request_id
        self.details: dict[str, Any] = dict(details or {})
        suffix = f" (request {request_id})" if request_id else ""
        super().__init__(f"{status} {code}: {message}{suffix}")


class JobFailed(VSSError):
    """A segmentation or adaptation job ended in ``failed`` (or ``cancelled``); ``job`` is its last state."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        error = job.get("error") or {}
        self.code = str(error.get("code") or job.get("state") or "failed")
        self.message = str(error.get("message") or f"job {job.get('id')} ended {job.get('state')}")
        super().__init__(f"job {job.get('id')} {job.get('state')}: {self.code}: {self.message}")


class StreamError(VSSError):
    """The server closed a stream because of an error; ``close_code`` is the websocket close code.

    ``code`` and ``message`` come from the server's ``{"type": "error"}`` message when it sent one.
    """

    def __init__(self, close_code: int | None, code: str, message: str) -> None:
        self.close_code, self.code, self.message = close_code, code, message
        super().__init__(f"stream closed ({close_code}): {code}: {message}")


class TimedOut(VSSError):
    """A wait (for a job, or for a restarting server) ran past its deadline."""
