"""The live engine: ``EngineManager`` is the only owner of the engine a server process serves.

Requests and streams call ``manager.current()`` once and keep that engine object, so they finish on
the version they started with. A swap builds and warms up the new engine completely, then flips
one reference under a lock; the old engine is freed when its last user lets go. Nothing ever calls
``load_state_dict`` on a serving module. A watcher thread polls the registry's ``ACTIVE`` pointer
so that every process sharing a model directory follows activations and rollbacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine
from .registry import RegistryError
from .registry_api import Registry

log = logging.getLogger(__name__)

EngineFactory = Callable[[str, Path, dict[str, Any]], Engine]  # (version, directory, meta) -> engine


class NotReady(RuntimeError):
    """No model version has been loaded (and warmed up) yet."""


class EngineLoadError(RegistryError):
    """A version could not be turned into a working engine; the previous engine keeps serving."""


@dataclass(frozen=True)
class SwapRecord:
    """What the last load attempt did."""

    version: str
    previous: str | None
    ok: bool
    seconds: float
    at: float  # unix time
    error: str | None = None


@dataclass(frozen=True)
class EngineOptions:
    """How versions become engines; built from ``Settings`` in ``create_app``."""

    backend: str = "torch"  # torch | onnx
    device: str = "auto"  # auto | cpu | cuda
    half: bool = False
    intra_op_threads: int = 0
    onnx_exporter: str = "legacy"
    onnx_tensorrt: bool = True
    cache_dir: Path | None = None


def make_engine_factory(options: EngineOptions) -> EngineFactory:
    """A factory that loads a registry version with the torch or the ONNX Runtime backend."""
    if options.backend not in ("torch", "onnx"):
        raise ValueError(f"unknown engine backend {options.backend!r}; choose torch or onnx")

    def build(version: str, directory: Path, meta: dict[str, Any]) -> Engine:
        if options.backend == "onnx":
            from .onnx_engine import OnnxEngine

            trt_cache = options.cache_dir / "tensorrt" if options.cache_dir is not None else None
            return OnnxEngine.from_checkpoint(directory, meta, version, cache_dir=options.cache_dir,
                                              exporter=options.onnx_exporter, device=options.device,
                                              intra_op_threads=options.intra_op_threads,
                                              tensorrt=options.onnx_tensorrt, fp16=options.half,
                                              trt_cache=trt_cache)
        import torch

        from models.checkpoint import load_checkpoint

        from .engine import TorchEngine

        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("device=cuda but torch sees no CUDA device")
        model, loaded_meta = load_checkpoint(directory)
        return TorchEngine(model, loaded_meta, version, device, options.half)

    return build


def warm_up(engine: Engine) -> None:
    """Run both halves once at the model's input size; raise if the outputs are not finite."""
    h, w = (int(v) for v in engine.meta["input_size"])
    frames = np.full((1, 3, h, w), 127.0, np.float32)
    logits = engine.frame_logits(frames)  # the engine's own form (a tensor on a torch engine's device)
    fused = engine.fuse(logits, logits, np.zeros((1, 2, h, w), np.float32))
    if not np.isfinite(fused).all():  # a non-finite logit makes its pixel's fused logits non-finite
        raise EngineLoadError(f"version {engine.version} produced non-finite logits on a warm-up frame")


class EngineManager:
    """Owns the live engine of one process; see the module docstring for the swap protocol."""

    def __init__(self, registry: Registry, factory: EngineFactory, poll_interval_s: float = 1.0,
                 retry_failed_s: float = 30.0, warmup: bool = True) -> None:
        self.registry = registry
        self.factory = factory
        self.poll_interval_s = poll_interval_s
        self.retry_failed_s = retry_failed_s
        self.warmup = warmup
        self._engine: Engine | None = None
        self._lock = threading.Lock()  # guards the reference flip
        self._load_lock = threading.Lock()  # one build at a time (watcher vs. activate route)
        self._failed: tuple[tuple[int, str], float] | None = None  # (ACTIVE stamp, when) of a failed load
        self._pointer_error: str | None = None
        self.pointer: str | None = None  # the version ACTIVE named at the last successful poll
        self.pointer_errors = 0  # polls that could not read ACTIVE (store or file system down)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0  # successful flips after the first load
        self.swap_failures = 0
        self.loaded_at: float | None = None
        self.last: SwapRecord | None = None
        # Called by the watcher after each poll with the serving engine (service/routing.py follows the
        # registry's domain versions this way); an exception is logged, the watcher goes on.
        self.followers: list[Callable[[Engine | None], object]] = []

    # --- readers -------------------------------------------------------------------------------
    def current(self) -> Engine:
        """The engine to use for one request or stream step; keep it for the whole unit of work."""
        with self._lock:
            engine = self._engine
        if engine is None:
            raise NotReady("no model version is loaded yet")
        return engine

    def peek(self) -> Engine | None:
        """The current engine or None, without raising."""
        with self._lock:
            return self._engine

    @property
    def ready(self) -> bool:
        return self.peek() is not None

    @property
    def version(self) -> str | None:
        engine = self.peek()
        return engine.version if engine is not None else None

    # --- swaps ---------------------------------------------------------------------------------
    def activate(self, version: str) -> Engine:
        """Load ``version``, and only if it works point ``ACTIVE`` at it and start serving it.

        Raises ``InvalidVersion`` / ``VersionNotFound`` / ``EngineLoadError``; on any error nothing
        changes (neither the pointer nor the engine).
        """
        self.registry.check(version)
        with self._load_lock:
            current = self.peek()
            engine = current if current is not None and current.version == version else self._build(version)
            self.registry.activate(version)
            self.pointer = version
            self._flip(engine)
            self._failed = None
            return engine

    def sync(self) -> bool:
        """Load the version named by ``ACTIVE`` if this process serves another one. True if it swapped.

        A failed load is logged, counted and remembered: the old engine keeps serving and the same
        pointer is retried only after ``retry_failed_s`` or when ``ACTIVE`` is rewritten.
        """
        with self._load_lock:
            try:
                stamp = self.registry.active_stamp()
            except (RegistryError, OSError) as e:
                self.pointer_errors += 1
                if str(e) != self._pointer_error:  # once per distinct problem, not on every poll
                    log.error("cannot read ACTIVE in %s (still serving %s): %s", self.registry.location,
                              self.version, e)
                self._pointer_error = str(e)
                return False
            if self._pointer_error is not None:
                log.info("ACTIVE in %s is readable again", self.registry.location)
            self._pointer_error = None
            self.pointer = stamp[1] if stamp is not None else None
            if stamp is None or stamp[1] == self.version:
                return False
            if self._failed is not None and self._failed[0] == stamp and \
                    time.monotonic() - self._failed[1] < self.retry_failed_s:
                return False
            try:
                engine = self._build(stamp[1])
            except EngineLoadError:
                self._failed = (stamp, time.monotonic())
                return False
            self._flip(engine)
            self._failed = None
            return True

    def _build(self, version: str) -> Engine:
        """Build and warm up an engine off to the side; the serving one is untouched."""
        started = time.perf_counter()
        previous = self.version
        try:
            directory = self.registry.path(version)
            engine = self.factory(version, directory, self.registry.meta(version))
            if self.warmup:
                warm_up(engine)
        except Exception as e:  # any failure of foreign code must leave the old engine serving
            self.swap_failures += 1
            message = f"{type(e).__name__}: {e}"
            self.last = SwapRecord(version, previous, False, time.perf_counter() - started, time.time(), message)
            log.error("loading model version %s failed; still serving %s: %s", version, previous, message,
                      exc_info=not isinstance(e, RegistryError | ValueError))
            raise EngineLoadError(f"cannot load model version {version}: {message}") from e
        self.last = SwapRecord(version, previous, True, time.perf_counter() - started, time.time())
        return engine

    def _flip(self, engine: Engine) -> None:
        with self._lock:
            previous, self._engine = self._engine, engine
        if previous is engine:
            return
        self.loaded_at = time.time()
        if previous is not None:
            self.swaps += 1
        if previous is None:
            log.info("serving model version %s (%s)", engine.version, engine.backend)
        else:
            log.info("swapped model version %s -> %s (%s)", previous.version, engine.version, engine.backend)

    # --- watcher -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watcher thread; its first poll loads the active version right away."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="vss-registry-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _watch(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:  # the watcher must outlive any single bad poll
                log.exception("registry watcher poll failed")
            for follow in self.followers:
                try:
                    follow(self.peek())
                except Exception:
                    log.exception("registry follower %r failed", follow)
            if self._stop.wait(self.poll_interval_s):
                return
