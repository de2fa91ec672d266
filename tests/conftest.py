"""Shared fixtures: a tiny random-init checkpoint and a short generated MP4 clip (both session-scoped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_INPUT_SIZE = (64, 128)  # (H, W) of the tiny checkpoint's network input
VIDEO_SIZE = (64, 128)
VIDEO_FRAMES = 6
VIDEO_FPS = 10.0


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: CPU tests share a small, busy machine (and results stay deterministic)."""
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ``mini-os8`` checkpoint (7 synthetic classes, input 64x128); treat it as read-only."""
    from models.accel import build_model
    from models.checkpoint import make_meta, save_checkpoint
    from models.classes import CLASS_SETS, palette_for
    from models.config import get_config

    torch.manual_seed(0)
    cfg = get_config("mini-os8")
    names = list(CLASS_SETS["synthetic"])
    meta = make_meta(cfg, names, palette_for(names), TINY_INPUT_SIZE, parent=None, source="test-random-init")
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(directory, build_model(cfg).eval(), meta)


@dataclass(frozen=True)
class SyntheticVideo:
    path: Path  # H.264 MP4 of the clip's frames
    frames: np.ndarray  # (T, H, W, 3) uint8, the frames before encoding
    labels: np.ndarray  # (T, H, W) uint8
    flow: np.ndarray  # (T, H, W, 2) float32 backward flow (flow[0] is zero)
    fps: float


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    """A 6-frame 64x128 ``source``-style clip from ``adaptation.synth`` written to MP4; read-only."""
    from adaptation.synth import generate_clip
    from service.video_io import VideoWriter

    clip = generate_clip("source", frames=VIDEO_FRAMES, size=VIDEO_SIZE, seed=0)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with VideoWriter(path, VIDEO_FPS, VIDEO_SIZE[1], VIDEO_SIZE[0], crf=18) as writer:
        for frame in clip.frames:
            writer.write(frame)
    return SyntheticVideo(path, clip.frames, clip.labels, clip.flow, VIDEO_FPS)
