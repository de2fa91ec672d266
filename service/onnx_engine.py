"""ONNX Runtime implementation of the ``Engine`` protocol (see ``service.engine``).

Runs the two graphs written by ``models.onnx_export``: ``model.onnx`` (per-frame network) and
``fusion.onnx`` (flow resize + warp + 1x1 fusion). Providers: TensorRT, then CUDA, then CPU, as far as
the installed onnxruntime has them (``onnxruntime-gpu`` in the GPU image); the engine keeps the first
that really creates both sessions. onnxruntime-gpu does not raise when a provider's libraries are
missing (TensorRT's ``libnvinfer.so.10``, or CUDA's): it logs and silently runs on the next provider,
so ``InferenceSession.get_providers()`` is checked to see which one was taken.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.onnx_export import (FRAME_FILE, FUSION_FILE, MIN_INPUT, export_checkpoint, is_current,
                                read_manifest)

log = logging.getLogger(__name__)

Provider = str | tuple[str, dict[str, Any]]
# (graph path, session options, providers in priority order) -> an ``ort.InferenceSession``
SessionFactory = Callable[[str, ort.SessionOptions, list[Provider]], Any]
CPU = "CPUExecutionProvider"


class OnnxEngineError(RuntimeError):
    """The ONNX graphs are missing, do not fit the checkpoint, or cannot run on the requested device."""


def select_providers(device: str = "auto", tensorrt: bool = True, trt_cache: Path | None = None,
                     fp16: bool = False, available: Sequence[str] | None = None) -> list[Provider]:
    """Execution providers in priority order for ``device`` (auto | cpu | cuda) among ``available``
    (default: what the installed onnxruntime lists). ``device="cuda"`` never ends with the CPU provider."""
    available = ort.get_available_providers() if available is None else list(available)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise OnnxEngineError("device=cuda but this onnxruntime build has no CUDAExecutionProvider "
                                  f"(available: {available}); install onnxruntime-gpu")
        return ["CPUExecutionProvider"]
    providers: list[Provider] = []
    if tensorrt and "TensorrtExecutionProvider" in available:
        options: dict[str, Any] = {"trt_fp16_enable": fp16}
        if trt_cache is not None:
            trt_cache.mkdir(parents=True, exist_ok=True)
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache))
        providers.append(("TensorrtExecutionProvider", options))
    providers.append("CUDAExecutionProvider")
    if device != "cuda":
        providers.append(CPU)
    return providers


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def default_session(path: str, options: ort.SessionOptions, providers: list[Provider]) -> Any:
    return ort.InferenceSession(path, options, providers=providers)


def open_sessions(paths: Sequence[Path], options: ort.SessionOptions, providers: list[Provider],
                  factory: SessionFactory = default_session) -> tuple[list[Any], str, list[str]]:
    """Sessions for ``paths`` on the first provider of ``providers`` that really serves all of them.

    Tries ``providers[i:]`` for i = 0, 1, ...: a try that raises moves on to the next provider. A try
    whose sessions all report (``get_providers()[0]``) a later provider of the list than the wanted
    one is kept: onnxruntime fell back by itself, and the providers in between are passed over.
    Returns the sessions, the provider that serves, and one line per provider passed over (why).
    """
    names = [provider_name(p) for p in providers]
    passed_over: list[str] = []

    def pass_over(name: str, why: str) -> None:
        passed_over.append(f"{name}: {why}")
        log.warning("ONNX Runtime provider %s is not usable here (%s)", name, why)

    i = 0
    while i < len(names):
        try:
            sessions = [factory(str(path), options, providers[i:]) for path in paths]
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/EPFail types
            pass_over(names[i], (str(e).strip().splitlines() or [type(e).__name__])[0])
            i += 1
            continue
        taken = sorted({session.get_providers()[0] for session in sessions})
        if len(taken) == 1 and taken[0] in names[i:]:
            for name in names[i:names.index(taken[0], i)]:
                pass_over(name, f"onnxruntime fell back to {taken[0]}")
            return sessions, taken[0], passed_over
        pass_over(names[i], f"onnxruntime fell back to {taken[0] if len(taken) == 1 else taken}")
        i += 1
    raise OnnxEngineError("no ONNX Runtime execution provider could run the graphs: " + "; ".join(passed_over))


def ensure_onnx(checkpoint_dir: str | Path, meta: dict[str, Any], cache_dir: Path | None = None,
                exporter: str = "legacy") -> Path:
    """Directory holding up-to-date ONNX graphs for a checkpoint, exporting them if needed.

    The export goes into the checkpoint directory itself (so a registry version carries its
    graphs); if that directory is read-only it goes to ``cache_dir/<weights sha256 prefix>``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    sha = meta.get("sha256")
    key = sha[:16] if sha else hashlib.sha256(str(checkpoint_dir.resolve()).encode()).hexdigest()[:16]
    cached = cache_dir / "onnx" / key if cache_dir is not None else None
    for candidate in (checkpoint_dir, cached):
        if candidate is not None and is_current(candidate, sha):
            return candidate
    try:
        export_checkpoint(checkpoint_dir, checkpoint_dir, exporter=exporter)
        return checkpoint_dir
    except PermissionError:
        if cached is None:
            raise
    log.info("checkpoint %s is read-only; exporting ONNX into %s", checkpoint_dir, cached)
    export_checkpoint(checkpoint_dir, cached, exporter=exporter)
    return cached


class OnnxEngine:
    """``Engine`` backed by two ONNX Runtime sessions; thread-safe (``InferenceSession.run`` is)."""

    backend = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, meta: dict[str, Any], version: str = "local",
                 device: str = "auto", intra_op_threads: int = 0, tensorrt: bool = True,
                 fp16: bool = False, trt_cache: Path | None = None, session_factory: SessionFactory = default_session,
                 available_providers: Sequence[str] | None = None) -> None:
        onnx_dir = Path(onnx_dir)
        frame_path, fusion_path = onnx_dir / FRAME_FILE, onnx_dir / FUSION_FILE
        for path in (frame_path, fusion_path):
            if not path.is_file():
                raise OnnxEngineError(f"missing ONNX graph {path} (run `vss export-onnx --checkpoint DIR`)")
        manifest = read_manifest(onnx_dir) or {}
        classes = int(meta["architecture"]["num_classes"])
        if manifest.get("num_classes", classes) != classes:
            raise OnnxEngineError(f"{onnx_dir}: graphs have {manifest['num_classes']} classes, "
                                  f"the checkpoint has {classes}")
        if meta.get("sha256") and manifest.get("weights_sha256") not in (None, meta["sha256"]):
            raise OnnxEngineError(f"{onnx_dir}: graphs were exported from other weights than this checkpoint")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; provider fallbacks are reported below
        providers = select_providers(device, tensorrt, trt_cache, fp16, available_providers)
        try:
            (self._frame, self._fusion), self.provider, self.passed_over = open_sessions(
                (frame_path, fusion_path), options, providers, session_factory)
        except OnnxEngineError as e:
            cuda = " (device=cuda: the CPU provider is not tried)" if device == "cuda" else ""
            raise OnnxEngineError(f"cannot load ONNX graphs from {onnx_dir}{cuda}: {e}") from e
        self.providers = self._frame.get_providers()
        log.info("ONNX Runtime serves %s with %s", version, self.provider,
                 extra={"provider": self.provider, "passed_over": self.passed_over})
        self.meta, self.version, self.onnx_dir = meta, version, onnx_dir
        self.input_size = tuple(meta["input_size"])
        self.num_classes = classes
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, meta: dict[str, Any], version: str = "local",
                        cache_dir: Path | None = None, exporter: str = "legacy", **kwargs: Any) -> OnnxEngine:
        """Engine for a checkpoint directory, exporting its graphs first if they are missing or stale."""
        return cls(ensure_onnx(checkpoint_dir, meta, cache_dir, exporter), meta, version, **kwargs)

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (N, 3, H, W), got shape {frames.shape}")
        if min(frames.shape[2:]) < MIN_INPUT:
            raise ValueError(f"frames must be at least {MIN_INPUT}x{MIN_INPUT} pixels, got {frames.shape[2:]}")
        x = np.ascontiguousarray(frames, dtype=np.float32)
        return self._frame.run(None, {"frames": x})[0]

    def fuse(self, current: np.ndarray, previous: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
        if current.shape != previous.shape or current.ndim != 4:
            raise ValueError(f"current and previous logits must match (N, C, h, w): "
                             f"{current.shape} vs {previous.shape}")
        if flow is None:
            # A zero flow at logit resolution: the in-graph resize and warp are then the identity.
            flow = np.zeros((current.shape[0], 2, *current.shape[2:]), np.float32)
        elif flow.ndim != 4 or flow.shape[:2] != (current.shape[0], 2):
            raise ValueError(f"flow must be (N, 2, H, W) with N = {current.shape[0]}, got {flow.shape}")
        feeds = {"current": np.ascontiguousarray(current, dtype=np.float32),
                 "previous": np.ascontiguousarray(previous, dtype=np.float32),
                 "flow": np.ascontiguousarray(flow, dtype=np.float32)}
        return self._fusion.run(None, feeds)[0]
