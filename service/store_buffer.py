"""The clip buffer on an object store (``VSS_BUFFER_DIR=s3://bucket/prefix``), shared by every replica.

Same layout and rules as ``service.buffer.ClipBuffer`` (``<id>.npz`` frames, then ``<id>.json``
metadata last, so a clip exists once its JSON does; eviction deletes the JSON first), with objects
instead of files. Clip ids start with the time in ns, so the listing is oldest first on every replica.

The bounds (``max_clips``, ``max_bytes``) are fleet-wide: after every add, the writer lists the whole
buffer (one LIST; the frame sizes come with it, no per-clip reads) and evicts the oldest clips until
both hold. Replicas that add at the same moment may each evict, which only ever removes more; the
buffer exceeds a bound at most by the clips being written at that instant, until their writers'
eviction passes. Clip metadata never changes once written, so each process caches what it has read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .buffer import (CLIP_ID_RE, FRAMES_SUFFIX, META_SUFFIX, ORPHAN_AGE_S, ClipBuffer, ClipDamaged, ClipInfo,
                     ClipNotFound, PROVENANCE_FIELDS, is_heldout, resize_frames)
from .storage import ObjectInfo, ObjectNotFound, ObjectStore, is_store_url, open_store

log = logging.getLogger(__name__)


class StoreClipBuffer(ClipBuffer):
    """``ClipBuffer`` whose clips live in an ``ObjectStore``."""

    def __init__(self, store: ObjectStore, max_clips: int = 500, max_bytes: int = 2 << 30,
                 heldout_fraction: float = 0.25) -> None:
        super().__init__(Path("."), max_clips, max_bytes, heldout_fraction)
        self.store = store
        self.root = store.url  # type: ignore[assignment]  # for log lines only
        self._infos: dict[str, ClipInfo] = {}
        self._lock = threading.Lock()

    # --- writing -------------------------------------------------------------------------------
    def add_new(self, frames: Sequence[np.ndarray] | np.ndarray, source: str = "api",
                size: tuple[int, int] | None = None,
                provenance: dict[str, Any] | None = None) -> tuple[ClipInfo, bool]:
        """``ClipBuffer.add_new`` on the store: frames first, metadata last; a clip whose frames are
        already buffered (same sha256, on any replica) is not stored again."""
        if len(frames) < 2:
            raise ValueError(f"a clip needs at least 2 consecutive frames, got {len(frames)}")
        stack = resize_frames(frames, size)
        digest = hashlib.sha256(stack.tobytes()).hexdigest()
        existing = next((c for c in self.clips() if c.sha256 == digest), None)
        if existing is not None:
            return existing, False
        prov = {k: v for k, v in (provenance or {}).items() if k in PROVENANCE_FIELDS}
        clip_id = f"{time.time_ns():020d}-{digest[:8]}"
        out = io.BytesIO()
        np.savez_compressed(out, frames=stack)
        data = out.getvalue()
        self.store.put(f"{clip_id}{FRAMES_SUFFIX}", data)
        t, h, w = stack.shape[:3]
        info = ClipInfo(clip_id, int(t), int(h), int(w), len(data), time.time(), str(source)[:32],
                        is_heldout(digest, self.heldout_fraction), digest, **prov)
        self.store.put(f"{clip_id}{META_SUFFIX}", json.dumps(info.to_dict()).encode())
        self.evict()
        return info, True

    def sweep(self) -> int:
        """Nothing to sweep: every put is atomic, and ``evict`` removes frames whose metadata never came."""
        return 0

    def remove(self, clip_id: str) -> bool:
        if not CLIP_ID_RE.fullmatch(clip_id):
            return False
        if not self.store.exists(f"{clip_id}{META_SUFFIX}"):
            return False
        self.store.delete(f"{clip_id}{META_SUFFIX}")
        self.store.delete(f"{clip_id}{FRAMES_SUFFIX}")
        with self._lock:
            self._infos.pop(clip_id, None)
        return True

    def evict(self) -> list[str]:
        objects = self.store.list()
        metas = sorted(o.key[:-len(META_SUFFIX)] for o in objects
                       if o.key.endswith(META_SUFFIX) and CLIP_ID_RE.fullmatch(o.key[:-len(META_SUFFIX)]))
        sizes = {o.key[:-len(FRAMES_SUFFIX)]: o.size for o in objects if o.key.endswith(FRAMES_SUFFIX)}
        total = sum(sizes.get(c, 0) for c in metas)
        removed = []
        while metas and (len(metas) > self.max_clips or total > self.max_bytes):
            oldest = metas.pop(0)
            total -= sizes.get(oldest, 0)
            self.store.delete(f"{oldest}{META_SUFFIX}")
            self.store.delete(f"{oldest}{FRAMES_SUFFIX}")
            with self._lock:
                self._infos.pop(oldest, None)
            removed.append(oldest)
        self._remove_orphan_objects(objects, set(metas) | set(removed))
        if removed:
            log.info("clip buffer %s: evicted %d clip(s)", self.store.url, len(removed))
        return removed

    def _remove_orphan_objects(self, objects: list[ObjectInfo], known: set[str]) -> None:
        """Frames whose metadata never came (a writer died between the two puts), once they are old."""
        cutoff_ns = (time.time() - ORPHAN_AGE_S) * 1e9
        for o in objects:
            stem = o.key[:-len(FRAMES_SUFFIX)]
            if o.key.endswith(FRAMES_SUFFIX) and stem not in known and CLIP_ID_RE.fullmatch(stem) \
                    and int(stem[:20]) < cutoff_ns:
                self.store.delete(o.key)

    # --- reading -------------------------------------------------------------------------------
    def clips(self) -> list[ClipInfo]:
        out = []
        for o in self.store.list():
            clip_id = o.key[:-len(META_SUFFIX)]
            if not (o.key.endswith(META_SUFFIX) and CLIP_ID_RE.fullmatch(clip_id)):
                continue
            with self._lock:
                info = self._infos.get(clip_id)
            if info is None:
                try:
                    info = ClipInfo(**json.loads(self.store.get(o.key).data))
                except (ObjectNotFound, ValueError, TypeError):
                    continue  # evicted while listing, or damaged
                with self._lock:
                    self._infos[clip_id] = info
            out.append(info)
        return sorted(out, key=lambda c: c.id)

    def load(self, clip_id: str) -> np.ndarray:
        if not CLIP_ID_RE.fullmatch(clip_id):
            raise ClipNotFound(f"invalid clip id {clip_id!r}")
        try:
            data = self.store.get(f"{clip_id}{FRAMES_SUFFIX}").data
        except ObjectNotFound as e:
            raise ClipNotFound(f"clip {clip_id} is not in the buffer (evicted?)") from e
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                frames = npz["frames"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ClipDamaged(f"clip {clip_id} is damaged: {e}") from e
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 2:
            raise ClipDamaged(f"clip {clip_id} holds {frames.dtype} frames of shape {frames.shape}")
        return frames


def open_clip_buffer(location: str | Path, max_clips: int, max_bytes: int, heldout_fraction: float) -> ClipBuffer:
    """A directory buffer (``ClipBuffer``) or one under an ``s3://`` URL (``StoreClipBuffer``)."""
    if is_store_url(location):
        return StoreClipBuffer(open_store(location), max_clips, max_bytes, heldout_fraction)
    return ClipBuffer(location, max_clips, max_bytes, heldout_fraction)
