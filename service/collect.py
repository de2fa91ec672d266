"""Who may feed the adaptation clip buffer, and how much: the policy, the provenance of a clip, per-client
rate limits, the pending clips of one input (handed over only once that input decoded completely), and the
clip-collection hook: ``clip_sampler`` gives an upload, a stream or a source the ``ClipSampler`` that cuts
its frames into clips and hands them over (``AdaptationPlane.sampler`` in ``service.components`` binds it
to the app's rate limiter and clip buffer; routes and sources only call that).

``VSS_COLLECT`` (``Settings.collect``) decides whose traffic may become training data:

- ``all``: every client's uploads and streams (and ``POST /v1/clips``);
- ``authenticated``: only requests that carry the server's API key (``Authorization: Bearer``);
- ``off``: nobody;
- ``auto`` (the default): ``authenticated`` when ``VSS_API_KEY`` is set, ``all`` when it is not.

Why ``auto``: a server without a key is the loopback demo (``vss serve`` refuses a public bind without
one), where the one user expects the model to adapt to the videos they send. A server with a key is
deployed: segmenting needs no key, so under ``all`` anyone who can reach it could choose what the model
is trained on. ``buffer_enabled=false`` turns collection off whatever ``VSS_COLLECT`` says.

Every client (its API key when authenticated, else its address) may add at most ``collect_rate_clips``
clips per ``collect_rate_window_s`` seconds, so no single client can own the buffer. The limiter is per
server process.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from starlette.requests import HTTPConnection

from .buffer import resize_frames
from .settings import Settings

MAX_PENDING_CLIPS = 4  # clips one upload may hold (at the model input size) until it decoded completely


@dataclass(frozen=True)
class Provenance:
    """Where a clip came from: recorded with it in the buffer."""

    route: str  # "/v1/segment", "/v1/stream" or "/v1/clips"
    request_id: str
    authenticated: bool
    client: str  # "key:<12 hex>" or "ip:<12 hex>": a hash, so GET /v1/clips shows no address or key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_mode(settings: Settings) -> str:
    """The effective policy: ``all``, ``authenticated`` or ``off`` (``auto`` resolved, see the module doc)."""
    if not settings.buffer_enabled:
        return "off"
    if settings.collect == "auto":
        return "authenticated" if settings.api_key_value() else "all"
    return settings.collect


def allows(mode: str, authenticated: bool) -> bool:
    return mode == "all" or (mode == "authenticated" and authenticated)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def provenance(conn: HTTPConnection, settings: Settings, route: str) -> Provenance:
    """The provenance of a request: authenticated when it carries the server's key (a wrong key is anonymous)."""
    expected = settings.api_key_value()
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    token = token.strip()
    authenticated = bool(expected and scheme.lower() == "bearer" and token
                         and hmac.compare_digest(token.encode(), expected.encode()))
    client = f"key:{_digest(token)}" if authenticated else f"ip:{_digest(conn.client.host if conn.client else '')}"
    request_id = str(conn.scope.get("state", {}).get("request_id", ""))
    return Provenance(route, request_id, authenticated, client)


class RateLimiter:
    """At most ``limit`` clips per client in any ``window_s`` seconds (a sliding window; thread-safe)."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._taken: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        stamps = self._taken.setdefault(client, deque())
        while stamps and now - stamps[0] >= self.window_s:
            stamps.popleft()
        return stamps

    def take(self, client: str, n: int = 1) -> bool:
        """Reserve ``n`` clips for ``client``: all of them, or none (False) when that would pass the limit."""
        with self._lock:
            now = self.clock()
            stamps = self._recent(client, now)
            if len(stamps) + n > self.limit:
                return False
            stamps.extend([now] * n)
            for other in [c for c, s in self._taken.items() if not s]:  # forget idle clients
                del self._taken[other]
            return True

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may add a clip again."""
        with self._lock:
            stamps = self._recent(client, self.clock())
            return 0 if len(stamps) < self.limit else max(int(self.window_s - (self.clock() - stamps[0])) + 1, 1)


class PendingClips:
    """Clips sampled from one input, held back until the input decoded completely (``commit``).

    An upload's decoding error is known only at its end, so its clips wait here; at most ``max_clips``
    are kept (each already resized to the model input size by the sampler).
    """

    def __init__(self, deliver: Callable[[list[np.ndarray]], None], max_clips: int = MAX_PENDING_CLIPS) -> None:
        self.deliver, self.max_clips = deliver, max_clips
        self._clips: list[list[np.ndarray]] = []

    def add(self, clip: list[np.ndarray]) -> None:
        if len(self._clips) < self.max_clips:
            self._clips.append(clip)

    def commit(self) -> int:
        """Hand every held clip over; returns how many."""
        clips, self._clips = self._clips, []
        for clip in clips:
            self.deliver(clip)
        return len(clips)

    def discard(self) -> None:
        self._clips = []


class ClipSampler:
    """Cuts runs of ``clip_frames`` consecutive frames, one every ``every``, resized to ``size`` (the model
    input) as they come, and hands them to ``deliver``; or, with ``pending``, holds them until ``commit``
    (an upload's clips wait until it decoded completely)."""

    def __init__(self, deliver: Callable[[list[np.ndarray]], None], clip_frames: int, every: int,
                 size: tuple[int, int] | None = None, pending: PendingClips | None = None) -> None:
        self.deliver = pending.add if pending is not None else deliver
        self.pending, self.clip_frames, self.every, self.size = pending, clip_frames, every, size
        self._seen = 0
        self._clip: list[np.ndarray] = []

    def push(self, frame: np.ndarray) -> None:
        if self._seen % self.every < self.clip_frames:
            self._clip.append(frame if self.size is None else resize_frames([frame], self.size)[0])
            if len(self._clip) == self.clip_frames:
                clip, self._clip = self._clip, []
                self.deliver(clip)
        self._seen += 1

    def commit(self) -> None:
        """The input decoded completely: hand the held clips over."""
        if self.pending is not None:
            self.pending.commit()


Offer = Callable[[list[np.ndarray], str, Provenance], bool]


def clip_sampler(settings: Settings, offer: Offer, size: tuple[int, int] | None, source: str, prov: Provenance,
                 hold: bool = False) -> ClipSampler | None:
    """The hook of one input: a sampler with the ``buffer_clip_frames`` / ``buffer_clip_every`` settings whose
    clips go to ``offer(frames, source, prov)``, or None when the collect policy does not let this client feed
    the buffer. ``source`` is "upload", "stream" or "source"; ``hold``: keep clips until ``commit`` (uploads).

    ``offer`` runs on the caller's thread (a worker thread), so it must return quickly: it hands the clip
    over (the app's rate limit, then the clip buffer's writer thread), it never trains."""
    if not allows(collect_mode(settings), prov.authenticated):
        return None

    def deliver(clip: list[np.ndarray]) -> None:
        offer(clip, source, prov)

    return ClipSampler(deliver, settings.buffer_clip_frames, max(settings.buffer_clip_every,
                                                                 settings.buffer_clip_frames),
                       size, PendingClips(deliver) if hold else None)
