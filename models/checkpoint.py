"""Checkpoints: ``model.safetensors`` + ``meta.json`` [+ ``source_stats.safetensors``] in one directory,
written atomically.

Only safetensors are ever loaded (no pickle). ``meta.json`` records the architecture, classes,
palette, normalisation, input size, parent version and provenance, plus the weights' sha256 and,
when the model carries source statistics (``models.source_stats``), ``"source_stats": {"file",
"sha256"}``; ``checkpoint_files`` lists the files of a checkpoint for copies and manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .accel import AccelSegmenter, build_model
from .atomic import FILE_MODE, replacing, replacing_dir, write_atomic
from .config import ModelConfig
from .source_stats import STATS, SourceStats, SourceStatsError, load_stats, save_stats

WEIGHTS = "model.safetensors"
META = "meta.json"
FORMAT = "vss-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not match what the caller expects."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_sha() -> str | None:
    """The repository's commit, for provenance; None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_meta(cfg: ModelConfig, classes: list[str], palette: list[list[int]], input_size: tuple[int, int],
              parent: str | None = None, **provenance: Any) -> dict[str, Any]:
    """Metadata for a new checkpoint; extra keyword arguments go to ``provenance``."""
    if len(classes) != cfg.num_classes or len(palette) != cfg.num_classes:
        raise CheckpointError(f"{cfg.num_classes} classes in the architecture but {len(classes)} names "
                              f"and {len(palette)} palette colours")
    return {
        "format": FORMAT,
        "architecture": cfg.to_dict(),
        "classes": list(classes),
        "palette": [list(map(int, c)) for c in palette],
        "input_size": [int(input_size[0]), int(input_size[1])],
        "parent": parent,
        "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_sha": git_sha(),
                       **provenance},
    }


def save_checkpoint(directory: str | Path, model: AccelSegmenter, meta: dict[str, Any]) -> Path:
    """Write weights + meta (+ ``model.source_stats`` when set) into a temp sibling directory, then
    rename it to ``directory``.

    Fails if ``directory`` already exists and is not empty (checkpoints are immutable).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"refusing to overwrite non-empty checkpoint directory {directory}")
    with replacing_dir(directory) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        meta = {k: v for k, v in meta.items() if k != "source_stats"}
        meta["sha256"] = sha256_file(tmp / WEIGHTS)
        files = [WEIGHTS, META]
        stats: SourceStats | None = model.source_stats
        if stats is not None:
            save_stats(stats, tmp / STATS)
            meta["source_stats"] = {"file": STATS, "sha256": sha256_file(tmp / STATS)}
            files.append(STATS)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        for f in files:  # safetensors creates private files; checkpoints are meant to be shared
            os.chmod(tmp / f, FILE_MODE)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint directory (no {META}): {directory}")
    try:
        meta = json.loads(path.read_text())
        ModelConfig.from_dict(meta["architecture"])
        meta["classes"], meta["palette"], meta["input_size"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid checkpoint metadata ({e})") from e
    return meta


def add_source_stats(directory: str | Path, stats: SourceStats) -> dict[str, Any]:
    """Store ``stats`` with the existing checkpoint in ``directory`` (statistics computed after training,
    e.g. for an imported model); the weights are not touched. Returns the new meta.

    The statistics file is written first, then ``meta.json`` naming it (each atomically), so a crash in
    between leaves the old, consistent checkpoint plus an unreferenced file.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if stats.num_classes != len(meta["classes"]):
        raise CheckpointError(f"statistics of {stats.num_classes} classes for a {len(meta['classes'])}-class "
                              f"checkpoint {directory}")
    with replacing(directory / STATS) as tmp:
        save_stats(stats, tmp)
    meta = {**meta, "source_stats": {"file": STATS, "sha256": sha256_file(directory / STATS)}}
    write_atomic(directory / META, json.dumps(meta, indent=2).encode())
    return meta


def checkpoint_files(directory: str | Path) -> list[str]:
    """The files that make up the checkpoint in ``directory`` (what a copy or a manifest must hold)."""
    return [WEIGHTS, META] + ([STATS] if read_meta(directory).get("source_stats") else [])


def load_source_stats(directory: str | Path, verify: bool = True) -> SourceStats | None:
    """The source statistics stored with the checkpoint in ``directory``; None for a checkpoint without.

    ``CheckpointError`` when ``meta.json`` names a statistics file that is missing, does not match its
    sha256 (with ``verify``) or cannot be read.
    """
    directory = Path(directory)
    entry = read_meta(directory).get("source_stats")
    if not entry:
        return None
    if not isinstance(entry, dict) or entry.get("file") != STATS:
        raise CheckpointError(f"{directory / META}: invalid source_stats entry {entry!r}")
    path = directory / STATS
    if not path.is_file():
        raise CheckpointError(f"missing source statistics file {path}")
    if verify and sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(f"{path}: sha256 does not match meta.json (corrupt or modified file)")
    try:
        return load_stats(path)
    except SourceStatsError as e:
        raise CheckpointError(str(e)) from e


def load_checkpoint(directory: str | Path, verify: bool = True,
                    num_classes: int | None = None) -> tuple[AccelSegmenter, dict[str, Any]]:
    """Build the model from ``meta.json`` and load the safetensors weights strictly.

    Raises ``CheckpointError`` with a precise message on a missing file, a checksum mismatch,
    missing/unexpected keys, wrong shapes, or a class count other than ``num_classes``.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    cfg = ModelConfig.from_dict(meta["architecture"])
    if num_classes is not None and cfg.num_classes != num_classes:
        raise CheckpointError(f"{directory}: checkpoint has {cfg.num_classes} classes, expected {num_classes}")
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    if verify and meta.get("sha256") and sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match meta.json (corrupt or modified file)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read safetensors ({e})") from e
    model = build_model(cfg)
    load_state_strict(model, state, str(weights))
    stats = load_source_stats(directory, verify)
    if stats is not None and stats.num_classes != cfg.num_classes:
        raise CheckpointError(f"{directory / STATS}: statistics of {stats.num_classes} classes for a "
                              f"{cfg.num_classes}-class model")
    model.source_stats = stats
    return model.eval(), meta


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable message listing what does not match."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"{source} does not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
