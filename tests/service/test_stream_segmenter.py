"""Streaming pipeline: exact post-processing, one forward per frame, hot swaps, colouring, file outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.flow import DISFlow, NoFlow
from service.engine import TorchEngine
from service.video_segmenter import segment_video
from service.stream_segmenter import NaiveSegmenter, StreamSegmenter, colorize, labels_from_logits, overlay
from service.video_io import VideoError


class CountingEngine:
    """Wraps an engine and counts per-frame network calls."""

    def __init__(self, engine: TorchEngine, version: str | None = None) -> None:
        self.inner, self.calls = engine, 0
        self.version = version or engine.version
        self.meta, self.backend = engine.meta, engine.backend

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        self.calls += len(frames)
        return self.inner.frame_logits(frames)

    def fuse(self, current: np.ndarray, previous: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
        return self.inner.fuse(current, previous, flow)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> TorchEngine:
    model, meta = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():  # a fusion that actually uses the warped t-1 logits
        model.fusion.conv.weight.add_(torch.randn_like(model.fusion.conv.weight) * 0.2)
    return TorchEngine(model, meta, version="v1")


def frames(n: int, h: int = 48, w: int = 80, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h + 2 * n, w + 2 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[i:i + h, 2 * i:2 * i + w]) for i in range(n)]


@pytest.mark.parametrize("size", [(32, 64), (61, 127), (200, 300)])
def test_labels_from_logits_match_torch_upsample_argmax(size: tuple[int, int]) -> None:
    logits = torch.randn(1, 7, 8, 16, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)[0].argmax(0).numpy()
    got = labels_from_logits(logits[0].numpy(), size)
    assert got.shape == size and got.dtype == np.uint8
    assert (got != ref).mean() < 1e-3  # float rounding at near-ties only


def test_stream_uses_one_forward_per_frame_and_matches_naive(engine: TorchEngine) -> None:
    clip = frames(4)
    stream, naive = CountingEngine(engine), CountingEngine(engine)
    s, n = StreamSegmenter(stream, DISFlow()), NaiveSegmenter(naive, DISFlow())
    results = [s.step(f) for f in clip]
    for f, r in zip(clip, results):
        np.testing.assert_array_equal(n.step(f).labels, r.labels)
    assert stream.calls == 4 and naive.calls == 4 + 3
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.keyframe for r in results] == [True, False, False, False]
    first = results[1]
    assert first.labels.shape == (48, 80) and first.model_version == "v1" and first.latency_ms > 0
    assert set(first.class_fractions) == set(engine.meta["classes"])
    assert sum(first.class_fractions.values()) == pytest.approx(1.0, abs=1e-4)


def test_cached_logits_change_the_result(engine: TorchEngine) -> None:
    a, b = frames(2, seed=3)
    s = StreamSegmenter(engine, NoFlow())
    s.step(a)
    with_history = s.step(b).labels
    s.reset()
    alone = s.step(b)
    assert alone.keyframe and alone.index == 0
    assert (alone.labels != with_history).any()


def test_output_size_and_odd_frames(engine: TorchEngine) -> None:
    s = StreamSegmenter(engine, DISFlow(), output_size=(30, 50))
    assert s.step(frames(1, 37, 91)[0]).labels.shape == (30, 50)
    s = StreamSegmenter(engine, DISFlow())
    assert s.step(frames(1, 37, 91)[0]).labels.shape == (37, 91)


def test_engine_swap_forces_a_keyframe(engine: TorchEngine) -> None:
    clip = frames(4)
    s = StreamSegmenter(CountingEngine(engine, "v1"), DISFlow())
    assert s.step(clip[0]).keyframe and not s.step(clip[1]).keyframe
    s.engine = CountingEngine(engine, "v2")
    swapped = s.step(clip[2])
    assert swapped.keyframe and swapped.model_version == "v2" and swapped.index == 2
    assert not s.step(clip[3]).keyframe


class CountingFlow:
    """DIS flow that counts its calls."""

    name = "counting-dis"

    def __init__(self) -> None:
        self.dis, self.calls = DISFlow(), 0

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray | None:
        self.calls += 1
        return self.dis(previous, current)


def test_prepared_frames_give_the_same_result_at_the_chosen_input_size(engine: TorchEngine) -> None:
    clip = frames(3)
    plain = StreamSegmenter(engine, DISFlow(), input_size=(40, 72))
    flow = CountingFlow()
    ahead = StreamSegmenter(engine, flow, input_size=(40, 72))
    ready, previous = [], None
    for f in clip:  # what segment_frames' prefetch thread does
        ready.append(ahead.prepare(f, previous))
        previous = ready[-1].small
    assert ready[0].flow is None and ready[1].small.shape == (40, 72, 3) and flow.calls == 2
    for f, r in zip(clip, ready):
        np.testing.assert_array_equal(ahead.advance(f, r).resolve().labels, plain.step(f).labels)
    assert flow.calls == 2  # advance used the prepared flow, it did not estimate it again
    wrong = StreamSegmenter(engine, DISFlow()).prepare(clip[0], None)  # at the model's 64x128
    with pytest.raises(ValueError, match=r"prepared frame \(64, 128\) is not at the input size \(40, 72\)"):
        ahead.advance(clip[0], wrong)


def test_torch_engine_keeps_logits_on_its_device_until_fuse(engine: TorchEngine) -> None:
    x = np.stack([f.transpose(2, 0, 1) for f in frames(2, 64, 128)]).astype(np.float32)
    logits = engine.frame_logits(x)
    assert isinstance(logits, torch.Tensor) and logits.device == engine.device
    fused = engine.fuse(logits[1:], logits[:1], None)
    assert isinstance(fused, np.ndarray) and fused.dtype == np.float32
    np.testing.assert_array_equal(fused, engine.fuse(logits[1:].numpy(), logits[:1].numpy(), None))


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32),
                                 np.zeros((8, 8, 4), np.uint8), [[0, 0, 0]]])
def test_bad_frames_are_refused(engine: TorchEngine, bad: object) -> None:
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB frame"):
        StreamSegmenter(engine, NoFlow()).step(bad)  # type: ignore[arg-type]


def test_colorize_and_overlay() -> None:
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(colorize(labels, palette), [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]])
    frame = np.full((2, 2, 3), 100, np.uint8)
    np.testing.assert_array_equal(overlay(frame, labels, palette, alpha=0.0), frame)
    np.testing.assert_array_equal(overlay(frame, labels, palette, alpha=1.0), colorize(labels, palette))
    big = overlay(np.zeros((4, 4, 3), np.uint8), labels, palette, alpha=1.0)  # labels resized (nearest)
    np.testing.assert_array_equal(big[3, 0], [0, 0, 255])
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay(frame, labels, palette, alpha=2.0)


def test_segment_video_reports_progress_and_writes_atomically(engine: TorchEngine, synthetic_video,
                                                              tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    out = tmp_path / "stats.json"
    summary = segment_video(engine, DISFlow(), synthetic_video.path, out, "json", stride=2,
                            progress=lambda done, total: seen.append((done, total)))
    assert summary["frames"] == 3 and summary["fps"] == pytest.approx(synthetic_video.fps / 2)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [f["source_index"] for f in json.loads(out.read_text())["frames"]] == [0, 2, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
    bad = tmp_path / "bad.mp4"
    data = synthetic_video.path.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.9)])  # decodes a few frames, then fails
    for fmt in ("zip", "mp4", "json"):
        with pytest.raises(VideoError, match="after [1-9] frames"):
            segment_video(engine, DISFlow(), bad, tmp_path / f"x.{fmt}", fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4", "stats.json"]
    with pytest.raises(ValueError, match="unknown output format"):
        segment_video(engine, DISFlow(), synthetic_video.path, tmp_path / "x.gif", "gif")
