"""The model registry on an object store (``VSS_MODEL_DIR=s3://bucket/prefix``).

Layout under the store's prefix::

    v0001/CLAIM            written first, create-only: reserves the name (two publishers never share one)
    v0001/model.safetensors, meta.json [, source_stats.safetensors] [, model.onnx, fusion.onnx, onnx.json]
    v0001/manifest.json    written LAST: {"version", "files": {name: {"sha256", "size"}}}
    ACTIVE                 one line, the version every replica serves
    RETIRED/v0002          a marker: the version is not routed to by its domain signature (``set_retired``)

A version is published once its manifest exists; a publisher that dies half-way leaves a claim and
some files but no manifest, which no reader ever lists, loads or activates. Versions never change.

``ACTIVE`` changes only by a conditional write: ``If-None-Match: *`` when it does not exist yet,
``If-Match: <ETag it was read with>`` otherwise. Of two concurrent activations exactly one wins; the
other gets ``ActivationConflict`` and nothing of it was written. A rollback is one such write.

Replicas poll ``ACTIVE`` with one HEAD (its ETag) per interval and GET it only when the ETag moved.
``path(version)`` downloads the version into ``<cache_dir>/models/<store id>/<version>``, checks
every file's size and sha256 against the manifest, and only then renames the directory into place:
a corrupt or partial download raises ``CorruptVersion`` and is never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from models.checkpoint import sha256_file

from .registry import (VERSION_RE, InvalidVersion, RegistryError, VersionNotFound, validate_version,
                       version_number)
from .registry_api import Registry
from .storage import ObjectNotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

ACTIVE_KEY, MANIFEST, CLAIM, RETIRED = "ACTIVE", "manifest.json", "CLAIM", "RETIRED"


def pointer_bytes(version: str) -> bytes:
    """``ACTIVE``'s content: the version, then a nonce, so that every write gets a new ETag (stores derive
    ETags from the content: re-activating the active version must still move the pointer's stamp, or a
    racing activation that read the old stamp would also win)."""
    return f"{version}\n{uuid.uuid4().hex}\n".encode()


def pointer_version(data: bytes) -> str:
    """The version named by ``ACTIVE``'s content (its first line)."""
    words = data.decode("utf-8", "replace").split()
    return words[0] if words else ""
WEIGHTS, META = "model.safetensors", "meta.json"
ONNX_FILES = ("model.onnx", "fusion.onnx", "onnx.json")


class ActivationConflict(RegistryError):
    """``ACTIVE`` was rewritten by someone else between reading it and writing it; nothing changed."""


class CorruptVersion(RegistryError):
    """A downloaded file does not match the version's manifest; the version is refused."""


def make_manifest(version: str, directory: Path, names: list[str]) -> dict[str, Any]:
    files = {n: {"sha256": sha256_file(directory / n), "size": (directory / n).stat().st_size} for n in names}
    return {"format": "vss-version/1", "version": version, "files": files, "created": round(time.time(), 3)}


def parse_manifest(version: str, data: bytes) -> dict[str, dict[str, Any]]:
    """The ``files`` table of a manifest; ``CorruptVersion`` if it is not one for ``version``."""
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        ok = manifest.get("version") == version and isinstance(files, dict) and META in files and WEIGHTS in files
        ok = ok and all(isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int) for v in files.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CorruptVersion(f"model version {version}: its manifest is not a valid vss-version/1 manifest")
    for name in files:
        if "/" in name or name.startswith(".") or name in (MANIFEST, CLAIM):
            raise CorruptVersion(f"model version {version}: its manifest names an invalid file {name!r}")
    return files


class StoreRegistry(Registry):
    """Model versions and ``ACTIVE`` on an ``ObjectStore``; verified local copies under ``cache_dir``."""

    def __init__(self, store: ObjectStore, cache_dir: str | Path = "var/cache") -> None:
        self.store = store
        store_id = hashlib.sha256(store.url.encode()).hexdigest()[:12]
        self.cache = Path(cache_dir) / "models" / store_id
        self._pointer: tuple[str, str] | None = None  # (ETag, version) last read
        self._manifests: dict[str, dict[str, dict[str, Any]]] = {}  # immutable once published
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.store.url

    # --- reading -------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        names = {o.key.split("/")[0] for o in self.store.list() if o.key.endswith(f"/{MANIFEST}")}
        return sorted((n for n in names if VERSION_RE.fullmatch(n)), key=version_number)

    def manifest(self, version: str) -> dict[str, dict[str, Any]]:
        """The version's file table (cached: published versions never change)."""
        validate_version(version)
        with self._lock:
            cached = self._manifests.get(version)
        if cached is not None:
            return cached
        try:
            blob = self.store.get(f"{version}/{MANIFEST}")
        except ObjectNotFound as e:
            raise VersionNotFound(f"model version {version} does not exist in {self.location}") from e
        files = parse_manifest(version, blob.data)
        with self._lock:
            self._manifests[version] = files
        return files

    def check(self, version: str) -> None:
        self.manifest(version)

    def meta(self, version: str) -> dict[str, Any]:
        from models.checkpoint import CheckpointError

        entry = self.manifest(version)[META]
        local = self.cache / version / META
        data = local.read_bytes() if local.is_file() else self.store.get(f"{version}/{META}").data
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"model version {version}: {META} does not match its manifest")
        try:
            return json.loads(data)
        except ValueError as e:
            raise CheckpointError(f"model version {version}: unreadable {META}: {e}") from e

    def has_onnx(self, version: str) -> bool:
        return all(name in self.manifest(version) for name in ONNX_FILES)

    def active(self) -> str | None:
        stamp = self.active_stamp()
        return stamp[1] if stamp else None

    def active_stamp(self) -> tuple[Hashable, str] | None:
        """One HEAD per call; the pointer is fetched only when its ETag changed."""
        try:
            etag = self.store.head(ACTIVE_KEY).etag
        except ObjectNotFound:
            return None
        pointer = self._pointer
        if pointer is not None and pointer[0] == etag:
            return pointer
        try:
            blob = self.store.get(ACTIVE_KEY)
        except ObjectNotFound:
            return None
        version = validate_version(pointer_version(blob.data))
        self._pointer = (blob.etag, version)
        return self._pointer

    def path(self, version: str) -> Path:
        """The verified local copy of ``version``, downloading it first if needed."""
        files = self.manifest(version)
        final = self.cache / version
        if final.is_dir():
            return final
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.cache, prefix=f".download-{version}-"))
        try:
            for name, entry in files.items():
                data = self.store.get(f"{version}/{name}").data
                digest = hashlib.sha256(data).hexdigest()
                if len(data) != entry["size"] or digest != entry["sha256"]:
                    raise CorruptVersion(
                        f"model version {version} in {self.location} is corrupt: {name} has {len(data)} bytes "
                        f"and sha256 {digest[:12]}..., its manifest says {entry['size']} bytes and "
                        f"{entry['sha256'][:12]}...; refusing to serve it")
                (staging / name).write_bytes(data)
            try:
                staging.rename(final)  # complete and verified, or not there at all
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # another thread or process got there first
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registry %s: downloaded and verified %s (%d files)", self.location, version, len(files))
        return final

    def retired(self) -> set[str]:
        """Versions with a ``RETIRED/<version>`` marker object (one LIST)."""
        names = {o.key.split("/", 1)[1] for o in self.store.list(f"{RETIRED}/")}
        return {n for n in names if VERSION_RE.fullmatch(n)}

    # --- writing -------------------------------------------------------------------------------
    def set_retired(self, version: str, retired: bool = True) -> None:
        """Put (one atomic object write) or delete the version's ``RETIRED`` marker."""
        self.check(version)
        if retired:
            self.store.put(f"{RETIRED}/{version}", f"{time.time():.3f}\n".encode())
        else:
            self.store.delete(f"{RETIRED}/{version}")
        log.info("registry %s: %s %s", self.location, version, "retired" if retired else "no longer retired")

    def ensure(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for entry in self.cache.glob(".download-*"):
            try:
                if now - entry.stat().st_mtime > 3600:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue

    def activate(self, version: str, if_stamp: Hashable | None = None) -> None:
        """Point ``ACTIVE`` at ``version`` by a conditional write.

        ``if_stamp`` (an ETag from ``active_stamp``): only replace that pointer. Without it, the
        pointer as read just now. A lost race raises ``ActivationConflict`` and writes nothing.
        """
        self.check(version)
        try:
            current: str | None = self.store.get(ACTIVE_KEY).etag
        except ObjectNotFound:
            current = None
        if if_stamp is not None and if_stamp != current:
            raise self._conflict(version)
        try:
            data = pointer_bytes(version)
            if current is None:
                etag = self.store.put(ACTIVE_KEY, data, create_only=True)
            else:
                etag = self.store.put(ACTIVE_KEY, data, if_match=current)
        except PreconditionFailed as e:
            raise self._conflict(version) from e
        self._pointer = (etag, version)
        log.info("registry %s: ACTIVE -> %s", self.location, version)

    def _conflict(self, version: str) -> ActivationConflict:
        try:
            now = pointer_version(self.store.get(ACTIVE_KEY).data) or "nothing"
        except ObjectNotFound:
            now = "nothing"
        return ActivationConflict(f"ACTIVE in {self.location} was changed by another activation (it now names "
                                  f"{now}); {version} was not activated")

    def publish(self, model: Any, meta: dict[str, Any], parent: str | None = None, activate: bool = False,
                onnx_exporter: str | None = None) -> str:
        from models.checkpoint import checkpoint_files, read_meta, save_checkpoint

        if parent is not None:
            validate_version(parent)
        meta = {**meta, "parent": parent if parent is not None else meta.get("parent")}
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=".publish-") as tmp:
            staging = Path(tmp) / "checkpoint"
            save_checkpoint(staging, model, meta)
            names = checkpoint_files(staging)  # weights, meta and the source statistics if any
            if onnx_exporter is not None:
                from models.onnx_export import export_onnx

                saved = read_meta(staging)
                export_onnx(model, staging, tuple(saved["input_size"]), saved.get("sha256"), onnx_exporter)
                names += list(ONNX_FILES)
            version = self._upload(staging, names)
        log.info("registry %s: published %s (parent %s)", self.location, version, meta["parent"])
        if activate:
            self.activate(version)
        return version

    def import_dir(self, source: str | Path, activate: bool = False) -> str:
        version = self._import(Path(source), None)
        assert version is not None
        if activate:
            self.activate(version)
        return version

    def seed(self, source: str | Path | None) -> str | None:
        """Like the directory registry's seed; several replicas starting at once import the source once."""
        from models.checkpoint import META as META_FILE

        versions = self.versions()
        if versions:
            if self.active() is not None:
                return None
            version = versions[-1]
        elif source is None or not (Path(source) / META_FILE).is_file():
            return None
        else:
            version = self._import(Path(source), "v0001")
            if version is None:
                return None  # another replica is seeding right now
        try:
            if self.active_stamp() is None:
                self.store.put(ACTIVE_KEY, pointer_bytes(version), create_only=True)
                return version
        except PreconditionFailed:
            pass  # another replica activated something first
        return None

    def _import(self, source: Path, name: str | None) -> str | None:
        from models.checkpoint import checkpoint_files, load_checkpoint, read_meta
        from models.onnx_export import is_current

        load_checkpoint(source)  # checksum, keys and shapes; raises CheckpointError with the reason
        names = checkpoint_files(source)
        if is_current(source, read_meta(source).get("sha256")):
            names += list(ONNX_FILES)
        version = self._upload(source, names, name)
        if version is not None:
            log.info("registry %s: imported %s as %s", self.location, source, version)
        return version

    def _upload(self, directory: Path, names: list[str], name: str | None = None) -> str | None:
        """Claim a version name, upload the files, write the manifest last. None if ``name`` was taken."""
        version = self._claim(name)
        if version is None:
            return None
        manifest = make_manifest(version, directory, names)
        for file_name in names:
            self.store.put(f"{version}/{file_name}", (directory / file_name).read_bytes())
        self.store.put(f"{version}/{MANIFEST}", json.dumps(manifest, indent=1).encode(), create_only=True)
        return version

    def _claim(self, name: str | None) -> str | None:
        claim = json.dumps({"host": socket.gethostname(), "id": uuid.uuid4().hex, "at": time.time()}).encode()
        if name is not None:
            try:
                self.store.put(f"{validate_version(name)}/{CLAIM}", claim, create_only=True)
                return name
            except PreconditionFailed:
                return None
        for _ in range(100):
            taken = [k for k in {o.key.split("/")[0] for o in self.store.list()} if VERSION_RE.fullmatch(k)]
            version = f"v{max(map(version_number, taken), default=0) + 1:04d}"
            try:
                self.store.put(f"{version}/{CLAIM}", claim, create_only=True)
                return version
            except PreconditionFailed:
                continue  # another publisher took it between the listing and the claim
        raise RegistryError(f"could not allocate a version name in {self.location} (too many concurrent publishes)")


__all__ = ["ActivationConflict", "CorruptVersion", "InvalidVersion", "StoreRegistry", "VersionNotFound"]
