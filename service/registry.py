"""The model registry in a local directory (``ModelRegistry``; ``store_registry`` keeps one on object storage).

Registry layout (one directory, possibly shared by several server processes and the worker)::

    v0001/  model.safetensors  meta.json  [model.onnx  fusion.onnx  onnx.json]
    v0002/  ...
    ACTIVE  one line: the version every server process should serve
    RETIRED/v0002  a marker: the version is not routed to by its domain signature (``set_retired``)

Versions are immutable. A publish writes a hidden staging directory and renames it to the next
free ``vNNNN`` (atomic; two concurrent publishers can never both get the same name). ``ACTIVE``
is replaced atomically (temp file + ``os.replace``), so a reader sees the old or the new pointer,
never half of one. Each server process's ``EngineManager`` (``service.engine_manager``, the owner of the live engine)
polls ``ACTIVE`` and swaps its engine by a reference flip; that is also how replicas behind a load balancer
follow a rollback.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from models.accel import AccelSegmenter
from models.atomic import TEMP_PREFIX, write_atomic
from models.checkpoint import META, CheckpointError, checkpoint_files, load_checkpoint, read_meta, save_checkpoint
from models.onnx_export import FRAME_FILE, FUSION_FILE, MANIFEST_FILE, is_current

from . import crashpoints
from .adapt_jobs import pid_alive
from .registry_api import Registry

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"v[0-9]{4,}", re.ASCII)  # ASCII digits only: "v٠٠٠١" is not a version
ACTIVE_FILE = "ACTIVE"
RETIRED_DIR = "RETIRED"
STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 3600.0
STALE_TEMP_FILE_S = 60.0  # a temp ACTIVE pointer lives for milliseconds
# ".staging-<pid>@<host>-<hex>" (publish), "..staging-...tmpXXXX" (save_checkpoint's own temp beside it)
_STAGING_OWNER_RE = re.compile(r"\.{1,2}staging-([0-9]+)@([A-Za-z0-9._-]+?)-[0-9a-f]{32}", re.ASCII)


class RegistryError(Exception):
    """Base class of registry errors."""


class InvalidVersion(RegistryError, ValueError):
    """A version name that is not ``v`` followed by at least four digits."""


class VersionNotFound(RegistryError, LookupError):
    """A well-formed version name with no directory in the registry."""


def validate_version(name: str) -> str:
    """Return ``name`` if it is a valid version name (``v`` + at least four ASCII digits), else raise
    ``InvalidVersion``.

    The pattern admits no separators or dots, so a valid name can never escape the registry root.
    """
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
        raise InvalidVersion(f"invalid model version {name!r}: expected 'v' and at least four digits, e.g. v0001")
    return name


def version_number(name: str) -> int:
    return int(validate_version(name)[1:])


class ModelRegistry(Registry):
    """Versioned checkpoint directories under ``root`` plus the atomic ``ACTIVE`` pointer."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    def check(self, version: str) -> None:
        self.path(version)

    # --- reading -------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """All published versions, oldest first."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir()
                 if VERSION_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(names, key=version_number)

    def path(self, version: str) -> Path:
        """Directory of an existing version (``InvalidVersion`` / ``VersionNotFound`` otherwise).

        A symbolic link is not a version: versions are directories the registry wrote itself, and a
        link could point anywhere (outside the registry, at /etc).
        """
        path = self.root / validate_version(version)
        if path.is_symlink() or not path.is_dir():
            raise VersionNotFound(f"model version {version} does not exist in the registry")
        return path

    def meta(self, version: str) -> dict[str, Any]:
        """``meta.json`` of a version (``CheckpointError`` if it is unreadable)."""
        return read_meta(self.path(version))

    def has_onnx(self, version: str) -> bool:
        """True if the version carries ONNX graphs exported from its current weights."""
        path = self.path(version)
        try:
            sha = read_meta(path).get("sha256")
        except CheckpointError:
            return False
        return is_current(path, sha)

    def active(self) -> str | None:
        """The version named by ``ACTIVE``, or None when there is no pointer yet."""
        stamp = self.active_stamp()
        return stamp[1] if stamp else None

    def active_stamp(self) -> tuple[int, str] | None:
        """``(mtime_ns, version)`` of ``ACTIVE``; None if absent. Raises ``InvalidVersion`` on garbage."""
        path = self.root / ACTIVE_FILE
        try:
            mtime = path.stat().st_mtime_ns
            content = path.read_text().strip()
        except FileNotFoundError:
            return None
        return mtime, validate_version(content)

    def retired(self) -> set[str]:
        """Versions with a ``RETIRED/<version>`` marker."""
        folder = self.root / RETIRED_DIR
        if not folder.is_dir():
            return set()
        return {p.name for p in folder.iterdir() if VERSION_RE.fullmatch(p.name)}

    # --- writing -------------------------------------------------------------------------------
    def set_retired(self, version: str, retired: bool = True) -> None:
        """Write (atomic temp + rename) or remove the version's ``RETIRED`` marker."""
        self.path(version)
        marker = self.root / RETIRED_DIR / version
        if retired:
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, f"{time.time():.3f}\n".encode())
        else:
            marker.unlink(missing_ok=True)
        log.info("registry %s: %s %s", self.root, version, "retired" if retired else "no longer retired")

    def ensure(self) -> None:
        """Create the root if needed and remove what crashed writers left: staging directories (also
        ``save_checkpoint``'s temp directory beside one) and temp ``ACTIVE`` pointers.

        A staging directory of a dead process on this host goes at once; any other one only after
        ``STALE_STAGING_S`` (a live publisher on another host may still be writing it).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        now, host = time.time(), socket.gethostname()
        for entry in self.root.iterdir():
            stale_after = _stale_after(entry.name, host)
            if stale_after is None:
                continue
            try:
                age = now - entry.lstat().st_mtime
            except FileNotFoundError:
                continue  # another publisher committed (renamed) it since the listing
            if age > stale_after:
                _remove(entry)

    def activate(self, version: str) -> None:
        """Point ``ACTIVE`` at an existing version whose metadata is readable (atomic replace)."""
        self.meta(version)
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / ACTIVE_FILE, f"{version}\n".encode())
        log.info("registry %s: ACTIVE -> %s", self.root, version)

    def publish(self, model: AccelSegmenter, meta: dict[str, Any], parent: str | None = None,
                activate: bool = False, onnx_exporter: str | None = None) -> str:
        """Save ``model`` as the next version and return its name; optionally export ONNX and activate.

        ``parent`` (the version it was adapted from) is recorded in ``meta.json``.
        """
        self.ensure()
        if parent is not None:
            validate_version(parent)
        meta = {**meta, "parent": parent if parent is not None else meta.get("parent")}
        staging = self.root / _staging_name()
        try:
            save_checkpoint(staging, model, meta)
            if onnx_exporter is not None:
                from models.onnx_export import export_onnx

                saved = read_meta(staging)
                export_onnx(model, staging, tuple(saved["input_size"]), saved.get("sha256"), onnx_exporter)
            crashpoints.reached("publish_staged")
            version = self._commit(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registry %s: published %s (parent %s)", self.root, version, meta["parent"])
        if activate:
            self.activate(version)
        return version

    def import_dir(self, source: str | Path, activate: bool = False) -> str:
        """Copy a checkpoint directory in as the next version after verifying it loads strictly."""
        source = Path(source)
        load_checkpoint(source)  # checksum, keys and shapes; raises CheckpointError with the reason
        meta = read_meta(source)
        self.ensure()
        staging = self.root / _staging_name()
        staging.mkdir()
        try:
            for name in checkpoint_files(source):  # weights, meta and the source statistics if any
                shutil.copy2(source / name, staging / name)
            if is_current(source, meta.get("sha256")):
                for name in (FRAME_FILE, FUSION_FILE, MANIFEST_FILE):
                    shutil.copy2(source / name, staging / name)
            _fsync_dir(staging)
            version = self._commit(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registry %s: imported %s as %s", self.root, source, version)
        if activate:
            self.activate(version)
        return version

    def seed(self, source: str | Path | None) -> str | None:
        """First start: import ``source`` as v0001 and activate it when the registry has no versions.

        If versions exist but nothing is active, the newest one is activated. Returns the version
        activated here, or None when the registry was already initialised (or there is no source).
        """
        self.ensure()
        versions = self.versions()
        if versions:
            if self.active() is None:
                self.activate(versions[-1])
                return versions[-1]
            return None
        if source is None or not (Path(source) / META).is_file():
            return None
        return self.import_dir(source, activate=True)

    def _commit(self, staging: Path) -> str:
        """Rename a complete staging directory to the next free version name."""
        for _ in range(100):
            existing = self.versions()
            version = f"v{(version_number(existing[-1]) + 1 if existing else 1):04d}"
            try:
                os.rename(staging, self.root / version)  # fails if another publisher took the name
            except OSError:
                if (self.root / version).exists():
                    continue
                raise
            _fsync_dir(self.root)
            return version
        raise RegistryError(f"could not allocate a version name in {self.root} (too many concurrent publishes)")


def _staging_name() -> str:
    """``.staging-<pid>@<host>-<hex>``: the owner in the name lets ``ensure`` remove it once the owner died."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    return f"{STAGING_PREFIX}{os.getpid()}@{host}-{uuid.uuid4().hex}"


def _stale_after(name: str, host: str) -> float | None:
    """Seconds after which a registry entry called ``name`` is an abandoned temp; None: not a temp name."""
    if name.startswith((f"{TEMP_PREFIX}{ACTIVE_FILE}.", f".{ACTIVE_FILE}.")):  # the second: older writers' name
        return STALE_TEMP_FILE_S
    if not name.lstrip(".").startswith(STAGING_PREFIX.lstrip(".")) or not name.startswith("."):
        return None
    owner = _STAGING_OWNER_RE.match(name)
    if owner and owner[2] == re.sub(r"[^A-Za-z0-9.-]", "_", host) and not pid_alive(int(owner[1])):
        return -1.0  # its publisher died (kill -9 while publishing)
    return STALE_STAGING_S


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a crash (best effort; not all filesystems allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
