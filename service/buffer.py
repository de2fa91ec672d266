"""The clip buffer: a bounded on-disk ring of short target clips that the adaptation worker trains on.

Layout of ``root`` (shared by every server process and the worker; no in-memory state is shared)::

    <id>.npz    frames (T, h, w, 3) uint8 RGB at the model input size (compressed)
    <id>.json   {"id", "frames", "height", "width", "bytes", "created", "source", "heldout", "sha256",
                 "route", "request_id", "authenticated", "client"}
    .lock       flock(2) lock held while a clip is added (the duplicate check and the writes)

(``bytes`` is the size of the frames file; the limits count it, the small JSON is not counted.)

A clip id is ``<unix time in ns, 20 digits>-<first 8 hex digits of the frames' sha256>``, so names
sort by age and two writers never collide. Both files are written to temp names and renamed into
place, the JSON last: a clip exists once its JSON does. Eviction removes the JSON first, so readers
never list a clip without frames (a reader racing an eviction gets ``ClipNotFound`` and skips it).

Clips are de-duplicated by content: adding frames whose sha256 (at the stored size) equals a buffered
clip's stores nothing and returns that clip. Each clip records its provenance (``service.collect``):
the route and request id it came from, whether the client was authenticated, and a hash of the client.

Held-out clips (``heldout``: true) are for the publish gate only and never trained on. The split is
decided once, when a clip is added, from the sha256 of its frames: deterministic, the same in every
process, and a clip seen twice (a looping video) always lands on the same side. ``ClipCollector``
writes clips sampled from live traffic on a background thread, so a request or stream never waits
for compression or disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .atomic import TEMP_PREFIX, locked, write_through

log = logging.getLogger(__name__)

CLIP_ID_RE = re.compile(r"^\d{20}-[0-9a-f]{8}$")
FRAMES_SUFFIX, META_SUFFIX = ".npz", ".json"
ORPHAN_AGE_S = 600.0  # frames without metadata (a writer died between the two renames) are removed after this
TEMP_AGE_S = 60.0  # temp files of a writer that died (writing one clip takes well under a second)


class ClipNotFound(LookupError):
    """The clip does not exist (never did, or was evicted)."""


class ClipDamaged(ValueError):
    """The clip's frames file cannot be read (truncated or foreign content)."""


@dataclass(frozen=True)
class ClipInfo:
    id: str
    frames: int
    height: int
    width: int
    bytes: int
    created: float
    source: str
    heldout: bool
    sha256: str
    route: str = ""
    request_id: str = ""
    authenticated: bool = False
    client: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROVENANCE_FIELDS = ("route", "request_id", "authenticated", "client")  # ClipInfo's provenance fields


def is_heldout(digest: str, fraction: float) -> bool:
    """The deterministic split: the first 16 hex digits of a clip's sha256 as a fraction of 2**64 < ``fraction``."""
    return int(digest[:16], 16) / 2.0**64 < fraction


def resize_frames(frames: Sequence[np.ndarray], size: tuple[int, int] | None) -> np.ndarray:
    """Stack RGB frames as (T, h, w, 3) uint8, resized to ``size`` = (h, w) when given."""
    out = []
    for frame in frames:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be (H, W, 3) RGB, got shape {frame.shape}")
        if frame.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frame.dtype}")
        if size is not None and frame.shape[:2] != tuple(size):
            h, w = size
            interp = cv2.INTER_AREA if frame.shape[0] > h else cv2.INTER_LINEAR
            frame = cv2.resize(np.ascontiguousarray(frame), (w, h), interpolation=interp)
        out.append(frame)
    shapes = {f.shape for f in out}
    if len(shapes) != 1:
        raise ValueError(f"all frames of a clip must have one size, got {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(out))


class ClipBuffer:
    """Bounded by ``max_clips`` and ``max_bytes`` (oldest evicted first); safe with several writer processes."""

    def __init__(self, root: str | Path, max_clips: int = 500, max_bytes: int = 2 << 30,
                 heldout_fraction: float = 0.25) -> None:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.root = Path(root)
        self.max_clips, self.max_bytes, self.heldout_fraction = max_clips, max_bytes, heldout_fraction

    # --- writing -------------------------------------------------------------------------------
    def add(self, frames: Sequence[np.ndarray] | np.ndarray, source: str = "api",
            size: tuple[int, int] | None = None, provenance: dict[str, Any] | None = None) -> ClipInfo:
        """Store consecutive RGB frames as a new clip (resized to ``size`` = (h, w) when given); frames
        already buffered are not stored again (the buffered clip is returned)."""
        return self.add_new(frames, source, size, provenance)[0]

    def add_new(self, frames: Sequence[np.ndarray] | np.ndarray, source: str = "api",
                size: tuple[int, int] | None = None,
                provenance: dict[str, Any] | None = None) -> tuple[ClipInfo, bool]:
        """``add``, also saying whether the clip is new (False: a duplicate of a buffered clip).

        ``provenance``: route, request_id, authenticated, client (``service.collect.Provenance``).
        On an error (a full disk) nothing of the clip remains.
        """
        if len(frames) < 2:
            raise ValueError(f"a clip needs at least 2 consecutive frames, got {len(frames)}")
        stack = resize_frames(frames, size)
        digest = hashlib.sha256(stack.tobytes()).hexdigest()
        prov = {k: v for k, v in (provenance or {}).items() if k in PROVENANCE_FIELDS}
        with self._locked():
            existing = self._find(digest)
            if existing is not None:
                return existing, False
            clip_id = f"{time.time_ns():020d}-{digest[:8]}"
            frames_path = self.root / f"{clip_id}{FRAMES_SUFFIX}"
            nbytes = write_through(frames_path, lambda f: np.savez_compressed(f, frames=stack))
            t, h, w = stack.shape[:3]
            info = ClipInfo(clip_id, int(t), int(h), int(w), nbytes, time.time(), str(source)[:32],
                            is_heldout(digest, self.heldout_fraction), digest, **prov)
            try:
                write_through(self.root / f"{clip_id}{META_SUFFIX}",
                              lambda f: f.write(json.dumps(info.to_dict()).encode()))
            except BaseException:
                frames_path.unlink(missing_ok=True)
                raise
        self.evict()
        return info, True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The directory lock around a read-modify-write."""
        with locked(self.root):
            yield

    def _find(self, digest: str) -> ClipInfo | None:
        """The buffered clip whose frames have this sha256 (ids end with its first 8 hex digits)."""
        for path in self.root.glob(f"*-{digest[:8]}{META_SUFFIX}"):
            try:
                info = ClipInfo(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if info.sha256 == digest:
                return info
        return None

    def sweep(self) -> int:
        """Remove what writers that died left behind (temp files, frames without metadata); at start."""
        if not self.root.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - TEMP_AGE_S
        for path in self.root.glob(f"{TEMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        self._remove_orphans({c.id for c in self.clips()})
        return removed

    def remove(self, clip_id: str) -> bool:
        """Delete one clip (metadata first); False if it was already gone."""
        if not CLIP_ID_RE.fullmatch(clip_id):
            return False
        try:
            (self.root / f"{clip_id}{META_SUFFIX}").unlink()
        except FileNotFoundError:
            return False
        (self.root / f"{clip_id}{FRAMES_SUFFIX}").unlink(missing_ok=True)
        return True

    def evict(self) -> list[str]:
        """Remove the oldest clips until both limits hold, and orphaned frame files; returns removed ids."""
        clips = self.clips()
        total = sum(c.bytes for c in clips)
        removed = []
        while clips and (len(clips) > self.max_clips or total > self.max_bytes):
            oldest = clips.pop(0)
            total -= oldest.bytes
            if self.remove(oldest.id):
                removed.append(oldest.id)
        self._remove_orphans({c.id for c in clips})
        if removed:
            log.info("clip buffer %s: evicted %d clip(s)", self.root, len(removed))
        return removed

    def clear(self) -> int:
        """Remove every clip; returns how many."""
        return sum(self.remove(c.id) for c in self.clips())

    def _remove_orphans(self, live: set[str]) -> None:
        cutoff = time.time() - ORPHAN_AGE_S
        for path in self.root.glob(f"*{FRAMES_SUFFIX}"):
            if path.stem in live or not CLIP_ID_RE.fullmatch(path.stem):
                continue
            try:
                if path.stat().st_mtime < cutoff and not (self.root / f"{path.stem}{META_SUFFIX}").exists():
                    path.unlink()
            except FileNotFoundError:
                continue

    # --- reading -------------------------------------------------------------------------------
    def clips(self) -> list[ClipInfo]:
        """Every complete clip, oldest first (unreadable metadata is skipped)."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob(f"*{META_SUFFIX}")):
            if not CLIP_ID_RE.fullmatch(path.stem):
                continue
            try:
                out.append(ClipInfo(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # evicted while listing, or a damaged file
        return out

    def load(self, clip_id: str) -> np.ndarray:
        """Frames (T, h, w, 3) uint8 of one clip; ``ClipNotFound`` if it is gone."""
        if not CLIP_ID_RE.fullmatch(clip_id):
            raise ClipNotFound(f"invalid clip id {clip_id!r}")
        try:
            with np.load(self.root / f"{clip_id}{FRAMES_SUFFIX}", allow_pickle=False) as data:
                frames = data["frames"]
        except FileNotFoundError as e:
            raise ClipNotFound(f"clip {clip_id} is not in the buffer (evicted?)") from e
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ClipDamaged(f"clip {clip_id} is damaged: {e}") from e
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 2:
            raise ClipDamaged(f"clip {clip_id} holds {frames.dtype} frames of shape {frames.shape}")
        return frames

    def count_since(self, timestamp: float) -> int:
        """Clips added after ``timestamp`` (unix seconds)."""
        return sum(c.created > timestamp for c in self.clips())

    def stats(self) -> dict[str, Any]:
        """Counts, bytes and the oldest/newest clip: the body of ``GET /v1/clips``."""
        clips = self.clips()
        held = sum(c.heldout for c in clips)
        return {
            "clips": len(clips), "train_clips": len(clips) - held, "heldout_clips": held,
            "frames": sum(c.frames for c in clips), "bytes": sum(c.bytes for c in clips),
            "max_clips": self.max_clips, "max_bytes": self.max_bytes,
            "oldest": clips[0].to_dict() if clips else None, "newest": clips[-1].to_dict() if clips else None,
            "sources": {s: sum(c.source == s for c in clips) for s in sorted({c.source for c in clips})},
            "authenticated_clips": sum(c.authenticated for c in clips),
        }


class ClipCollector:
    """Writes clips sampled from traffic into a ``ClipBuffer`` on one background thread.

    ``submit`` never blocks: when ``queue_size`` clips are already waiting the new one is dropped
    (counted in ``dropped``). ``size_fn`` gives the model input size to store clips at (None: the
    clip is skipped, e.g. before a model is loaded).
    """

    def __init__(self, buffer: ClipBuffer, size_fn: Callable[[], tuple[int, int] | None], queue_size: int = 4,
                 on_added: Callable[[ClipInfo], None] | None = None) -> None:
        self.buffer, self.size_fn, self.on_added = buffer, size_fn, on_added
        self._queue: queue.Queue[tuple[list[np.ndarray], str, dict[str, Any] | None] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.added = self.dropped = self.failed = self.duplicates = 0

    def submit(self, frames: Sequence[np.ndarray], source: str, provenance: dict[str, Any] | None = None) -> bool:
        """Queue a clip for writing; False if it was dropped."""
        self._ensure_thread()
        try:
            self._queue.put_nowait((list(frames), source, provenance))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted clip is written (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vss-clip-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                frames, source, provenance = item
                size = self.size_fn()
                if size is None:
                    self.dropped += 1
                    continue
                info, new = self.buffer.add_new(frames, source, size, provenance)
                if not new:
                    self.duplicates += 1
                    continue
                self.added += 1
                if self.on_added is not None:
                    self.on_added(info)
            except Exception:  # a bad clip or a full disk must not stop collection
                self.failed += 1
                log.exception("could not write a clip to the buffer %s", self.buffer.root)
            finally:
                self._queue.task_done()
