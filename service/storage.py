"""Object storage behind one small interface: a local directory or an S3 bucket (``s3://bucket/prefix``).

Every key is a ``/``-separated relative name (``v0003/model.safetensors``, ``ACTIVE``). Operations:

* ``get`` (bytes and ETag), ``head`` (size and ETag), ``list`` by prefix, ``delete`` (absent is fine);
* ``put``, atomic: readers see the old object or the new one, never a torn one (S3 PUTs are atomic;
  the local backend writes a temp file and renames it into place);
* conditional ``put``: ``create_only=True`` (``If-None-Match: *``) or ``if_match=ETAG`` (compare and
  swap); a lost race raises ``PreconditionFailed``. Every put returns the new ETag.

``open_store(url)`` picks the backend. S3 endpoint and credentials come from the standard variables
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and
``AWS_REGION`` (the client is obstore, pinned). Requests time out and retry briefly, so a store that
is down turns into ``StoreUnavailable`` within seconds, and every such failure is counted in
``STORE_ERRORS`` (exported on ``/metrics``).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .atomic import locked, write_atomic

S3_SCHEME = "s3://"
KEY_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # no hidden names: temp files and locks are hidden
SMALL_OBJECT = 1 << 20  # local ETags: content hash up to this size, stat fields above


class StoreError(OSError):
    """The object store failed (base class)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with a server error."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """No object under this key."""


class PreconditionFailed(StoreError):
    """A conditional put lost: the object exists (create_only) or its ETag changed (if_match)."""


class ErrorCounter:
    """Thread-safe count of store failures by operation (process-wide; read by ``/metrics``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, op: str) -> None:
        with self._lock:
            self._counts[op] = self._counts.get(op, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        return sum(self.snapshot().values())


STORE_ERRORS = ErrorCounter()
STORE_OPS = ("get", "head", "put", "list", "delete")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str


def validate_key(key: str) -> str:
    """Return ``key`` if every ``/`` part is a plain name (no ``..``, no hidden or empty parts)."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if not all(KEY_PART_RE.fullmatch(p) for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(ABC):
    """The storage interface; ``url`` names it in logs and errors."""

    url: str

    @abstractmethod
    def get(self, key: str) -> Blob:
        """The object's bytes and ETag; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and ETag without the body; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def put(self, key: str, data: bytes, *, create_only: bool = False, if_match: str | None = None) -> str:
        """Store ``data`` atomically and return its ETag; conditional with ``create_only`` / ``if_match``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (no error if it is absent)."""

    @abstractmethod
    def child(self, name: str) -> ObjectStore:
        """The same backend one level down (``<url>/<name>``), e.g. job records next to the clips."""

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True


# --- local directory ----------------------------------------------------------------------------
class LocalStore(ObjectStore):
    """Objects as files under ``root``; conditional puts hold an flock on ``root/.lock``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def get(self, key: str) -> Blob:
        try:
            with open(self._path(key), "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from e
        return Blob(data, _local_etag(st, data if st.st_size <= SMALL_OBJECT else None))

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
            if not path.is_file():
                raise FileNotFoundError(key)
            small = path.read_bytes() if st.st_size <= SMALL_OBJECT else None
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from e
        return ObjectInfo(key, st.st_size, _local_etag(st, small))

    def put(self, key: str, data: bytes, *, create_only: bool = False, if_match: str | None = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not create_only and if_match is None:
            write_atomic(path, data)
            return self.head(key).etag
        with locked(self.root):
            try:
                current = self.head(key).etag
            except ObjectNotFound:
                current = None
            if create_only and current is not None:
                raise PreconditionFailed(f"object {key!r} already exists in {self.url}")
            if if_match is not None and current != if_match:
                raise PreconditionFailed(f"object {key!r} in {self.url} changed (ETag {current}, expected {if_match})")
            write_atomic(path, data)
            return self.head(key).etag

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if name.startswith(".") or not key.startswith(prefix):
                    continue
                try:
                    out.append(self.head(key))
                except (ObjectNotFound, ValueError):
                    continue  # removed while listing, or a name that is not a key
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child(self, name: str) -> ObjectStore:
        return LocalStore(self._path(name))


def _local_etag(st: os.stat_result, small: bytes | None) -> str:
    """Content hash for small files (pointers: no ABA on inode reuse); inode, mtime and size for big ones."""
    if small is not None:
        return '"' + hashlib.sha256(small).hexdigest()[:32] + '"'
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


# --- S3 ------------------------------------------------------------------------------------------
def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix"); ``ValueError`` with the reason otherwise."""
    if not url.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"invalid bucket name {bucket!r} in {url!r} (3-63 characters: a-z, 0-9, '.', '-')")
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix)
    return bucket, prefix


def s3_config(env: Mapping[str, str]) -> dict[str, str]:
    """obstore's S3 settings from the standard AWS variables that are set in ``env``."""
    names = {"AWS_ENDPOINT_URL": "endpoint", "AWS_ACCESS_KEY_ID": "access_key_id",
             "AWS_SECRET_ACCESS_KEY": "secret_access_key", "AWS_SESSION_TOKEN": "session_token",
             "AWS_REGION": "region", "AWS_DEFAULT_REGION": "default_region"}
    return {option: env[var] for var, option in names.items() if env.get(var)}


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` through obstore (conditional puts need a store that honours them)."""

    def __init__(self, url: str, env: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 retries: int = 2) -> None:
        from obstore.store import S3Store as _S3

        self.bucket, self.prefix = parse_s3_url(url)
        self.env, self.timeout_s, self.retries = env, timeout_s, retries
        self.url = f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        config = s3_config(os.environ if env is None else env)
        config.setdefault("region", config.get("default_region", "us-east-1"))
        client = {"timeout": timedelta(seconds=timeout_s), "connect_timeout": timedelta(seconds=min(timeout_s, 2.0)),
                  "allow_http": config.get("endpoint", "").startswith("http://")}
        retry = {"max_retries": retries, "retry_timeout": timedelta(seconds=timeout_s),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1)}}
        self._store = _S3(self.bucket, prefix=self.prefix or None, config=config, client_options=client,
                          retry_config=retry)

    @contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        try:
            yield
        except (NotFoundError, FileNotFoundError) as e:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from e
        except (AlreadyExistsError, PreconditionError) as e:
            raise PreconditionFailed(f"conditional {op} of {key!r} in {self.url} lost: {_first_line(e)}") from e
        except Exception as e:  # network, server and auth errors of the client
            STORE_ERRORS.add(op)
            raise StoreUnavailable(f"object store {self.url}: {op} {key!r} failed: {_first_line(e)}") from e

    def get(self, key: str) -> Blob:
        import obstore

        with self._errors("get", validate_key(key)):
            result = obstore.get(self._store, key)
            data = bytes(result.bytes())
        return Blob(data, result.meta["e_tag"] or "")

    def head(self, key: str) -> ObjectInfo:
        import obstore

        with self._errors("head", validate_key(key)):
            meta = obstore.head(self._store, key)
        return ObjectInfo(key, int(meta["size"]), meta["e_tag"] or "")

    def put(self, key: str, data: bytes, *, create_only: bool = False, if_match: str | None = None) -> str:
        import obstore

        mode = "create" if create_only else {"e_tag": if_match} if if_match is not None else "overwrite"
        with self._errors("put", validate_key(key)):
            result = obstore.put(self._store, key, data, mode=mode)  # type: ignore[arg-type]
        return result["e_tag"] or ""

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        import obstore

        base = prefix.rsplit("/", 1)[0] if "/" in prefix else None  # obstore lists whole path segments
        with self._errors("list", prefix):
            found = [o for chunk in obstore.list(self._store, base) for o in chunk]
        out = [ObjectInfo(o["path"], int(o["size"]), o["e_tag"] or "") for o in found]
        return sorted((o for o in out if o.key.startswith(prefix)), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        import obstore

        try:
            with self._errors("delete", validate_key(key)):
                obstore.delete(self._store, key)
        except ObjectNotFound:
            pass

    def child(self, name: str) -> ObjectStore:
        return S3Store(f"{self.url}/{validate_key(name)}", self.env, self.timeout_s, self.retries)


def _first_line(e: BaseException) -> str:
    """The client's message without its timings, so that one outage logs one distinct error."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    line = re.sub(r" in [0-9.]+(?:ns|µs|us|ms|s)\b|,? ?after \d+ retries, max_retries: \d+, retry_timeout: \S+",
                  "", line)
    return line[:300]


def is_store_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def open_store(location: str | Path, env: Mapping[str, str] | None = None) -> ObjectStore:
    """``s3://bucket/prefix`` -> ``S3Store``; anything else is a local directory."""
    if is_store_url(location):
        return S3Store(str(location), env)
    return LocalStore(location)
