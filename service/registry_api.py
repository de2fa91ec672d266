"""The model registry interface that ``EngineManager``, the routes, the worker and the CLI use.

Two implementations: ``service.registry.ModelRegistry`` (a local or shared directory) and
``service.store_registry.StoreRegistry`` (an object store, ``s3://bucket/prefix``). ``open_registry``
picks one from ``VSS_MODEL_DIR``. Errors are the ``RegistryError`` family of ``service.registry``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from pathlib import Path
from typing import Any


class Registry(ABC):
    """Immutable model versions (``v0001``, ...) and the ``ACTIVE`` pointer every replica follows."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the registry lives (a directory or an ``s3://`` URL), for logs and messages."""

    @abstractmethod
    def versions(self) -> list[str]:
        """Published (complete) versions, oldest first."""

    @abstractmethod
    def check(self, version: str) -> None:
        """Raise ``InvalidVersion`` or ``VersionNotFound`` unless ``version`` is published. Cheap."""

    @abstractmethod
    def path(self, version: str) -> Path:
        """A local directory holding the version's files, verified (a remote registry downloads first)."""

    @abstractmethod
    def meta(self, version: str) -> dict[str, Any]:
        """The version's ``meta.json`` (``CheckpointError`` if unreadable)."""

    @abstractmethod
    def has_onnx(self, version: str) -> bool:
        """True if the version carries ONNX graphs exported from its weights."""

    @abstractmethod
    def active(self) -> str | None:
        """The version ``ACTIVE`` names, or None when there is no pointer yet."""

    @abstractmethod
    def active_stamp(self) -> tuple[Hashable, str] | None:
        """``(stamp, version)`` of ``ACTIVE``; the stamp changes whenever the pointer is rewritten."""

    @abstractmethod
    def activate(self, version: str) -> None:
        """Point ``ACTIVE`` at a published version."""

    @abstractmethod
    def retired(self) -> set[str]:
        """Versions taken out of per-domain routing (``set_retired``); they stay published and activatable."""

    @abstractmethod
    def set_retired(self, version: str, retired: bool = True) -> None:
        """Retire (or bring back) a published version for routing: one marker per version, written or removed
        atomically, so concurrent calls for different versions never lose each other's update."""

    @abstractmethod
    def publish(self, model: Any, meta: dict[str, Any], parent: str | None = None, activate: bool = False,
                onnx_exporter: str | None = None) -> str:
        """Save ``model`` as the next version; returns its name."""

    @abstractmethod
    def import_dir(self, source: str | Path, activate: bool = False) -> str:
        """Copy a checkpoint directory in as the next version after verifying it loads."""

    @abstractmethod
    def seed(self, source: str | Path | None) -> str | None:
        """First start: import ``source`` and activate it when the registry is empty."""

    @abstractmethod
    def ensure(self) -> None:
        """Prepare the registry for writing (create the root, clean abandoned staging)."""


def open_registry(location: str | Path, cache_dir: str | Path = "var/cache") -> Registry:
    """``s3://bucket/prefix`` -> ``StoreRegistry`` (downloads into ``cache_dir``); else a ``ModelRegistry``."""
    from .storage import is_store_url, open_store

    if is_store_url(location):
        from .store_registry import StoreRegistry

        return StoreRegistry(open_store(location), cache_dir)
    from .registry import ModelRegistry

    return ModelRegistry(location)
