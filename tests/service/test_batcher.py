"""Batching across streams (service/batcher.py): same results as unbatched, per-stream order and state,
model swaps, deadlines (a fake clock and conditions, no sleeps), errors; torch and ONNX Runtime engines."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.onnx_export import export_onnx
from service.batcher import Batcher
from service.engine import TorchEngine
from service.segment_jobs import FairLock, LockedEngine
from service.onnx_engine import OnnxEngine
from service.stream_segmenter import PendingFrame, StreamSegmenter
from tests.waiting import wait_until

FOREVER = 3600.0  # a max wait no test reaches: a batch that runs must have been full (or the fake clock moved)


class ShiftFlow:
    """A fixed, deterministic backward flow (1.5 px right, 0.5 px down) so the warp is exercised."""

    name = "shift"

    def __call__(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        flow = np.empty((*current.shape[:2], 2), np.float32)
        flow[..., 0], flow[..., 1] = 1.5, 0.5
        return flow


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recording:
    """An engine wrapper that records the batch size of every ``frame_logits`` call (and can fail once)."""

    def __init__(self, engine: Any, version: str | None = None, fail_first: bool = False) -> None:
        self.inner, self.sizes, self.fail_first = engine, [], fail_first
        self.version = version or engine.version
        self.meta, self.backend = engine.meta, engine.backend

    def frame_logits(self, frames: np.ndarray) -> np.ndarray:
        self.sizes.append(len(frames))
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("device lost")
        return self.inner.frame_logits(frames)

    def fuse(self, current: np.ndarray, previous: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
        return self.inner.fuse(current, previous, flow)


def _torch_engine(checkpoint: Path, version: str, seed: int) -> TorchEngine:
    model, meta = load_checkpoint(checkpoint)
    with torch.no_grad():  # a fusion that mixes in the warped t-1 logits; the seed makes versions differ
        gen = torch.Generator().manual_seed(seed)
        model.fusion.conv.weight.add_(0.3 * torch.randn(model.fusion.conv.weight.shape, generator=gen))
        for p in model.net.parameters():
            p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
    return TorchEngine(model, meta, version)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch_v1 = _torch_engine(tiny_checkpoint, "v1", 0)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(torch_v1.model, out, tuple(torch_v1.meta["input_size"]), torch_v1.meta["sha256"])
    return {"torch": torch_v1, "torch-v2": _torch_engine(tiny_checkpoint, "v2", 1),
            "onnx": OnnxEngine(out, torch_v1.meta, "v1", device="cpu", intra_op_threads=1)}


def clip(n: int, seed: int, h: int = 48, w: int = 80) -> list[np.ndarray]:
    """A pan over random texture; every seed is another stream's content."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h + 2 * n, w + 2 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[i:i + h, 2 * i:2 * i + w]) for i in range(n)]


def unbatched(engine: Any, frames: list[np.ndarray], swap: tuple[int, Any] | None = None) -> list[PendingFrame]:
    segmenter = StreamSegmenter(engine, ShiftFlow())
    out = []
    for i, frame in enumerate(frames):
        if swap is not None and i == swap[0]:
            segmenter.engine = swap[1]
        out.append(segmenter.advance(frame))
    return out


def batched(batcher: Batcher, engine: Any, streams: list[list[np.ndarray]],
            swap: tuple[int, Any] | None = None) -> list[list[PendingFrame]]:
    """Each stream in its own thread, its frames one after the other, network calls through ``batcher``."""
    results: list[list[PendingFrame]] = [[] for _ in streams]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            segmenter = StreamSegmenter(LockedEngine(engine, batcher.lock, batcher), ShiftFlow())
            for i, frame in enumerate(streams[k]):
                if swap is not None and i == swap[0]:
                    segmenter.engine = LockedEngine(swap[1], batcher.lock, batcher)
                results[k].append(segmenter.advance(frame))
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a stream is stuck in the batcher"
    assert not errors, errors
    return results


def assert_same(got: list[PendingFrame], want: list[PendingFrame]) -> None:
    assert [p.index for p in got] == list(range(len(want)))  # the stream's own order
    assert [(p.keyframe, p.model_version) for p in got] == [(p.keyframe, p.model_version) for p in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logits, w.logits, rtol=1e-4, atol=1e-4 * np.abs(w.logits).max())


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_lockstep_streams_run_as_full_batches_with_unbatched_results(engines: dict[str, Any], backend: str) -> None:
    engine = Recording(engines[backend])
    streams = [clip(5, seed=k) for k in range(4)]
    batcher = Batcher(max_batch=4, max_wait_s=FOREVER, lock=FairLock())
    results = batched(batcher, engine, streams)
    assert engine.sizes == [4] * 5  # full batches run at once: the wait of an hour was never needed
    assert (batcher.stats.batches, batcher.stats.frames, batcher.stats.largest) == (5, 20, 4)
    for k, stream in enumerate(streams):
        assert_same(results[k], unbatched(engines[backend], stream))


def test_uneven_interleaved_streams_keep_their_own_state_and_order(engines: dict[str, Any]) -> None:
    engine = Recording(engines["torch"])
    streams = [clip(n, seed=10 + k) for k, n in enumerate((3, 6, 4, 7, 5))]
    batcher = Batcher(max_batch=3, max_wait_s=0.02)  # groups form however the threads happen to meet
    results = batched(batcher, engine, streams)
    assert max(engine.sizes) <= 3 and sum(engine.sizes) == 25 == batcher.stats.frames
    for k, stream in enumerate(streams):
        assert_same(results[k], unbatched(engines["torch"], stream))


def test_a_swap_between_frames_keyframes_every_stream_on_the_new_version(engines: dict[str, Any]) -> None:
    v1, v2 = Recording(engines["torch"]), Recording(engines["torch-v2"])
    streams = [clip(4, seed=20 + k) for k in range(3)]
    results = batched(Batcher(3, FOREVER), v1, streams, swap=(2, v2))
    assert v1.sizes == [3, 3] and v2.sizes == [3, 3]
    for k, stream in enumerate(streams):
        assert [p.keyframe for p in results[k]] == [True, False, True, False]
        assert_same(results[k], unbatched(engines["torch"], stream, swap=(2, engines["torch-v2"])))


def submit(batcher: Batcher, engine: Any, frames: np.ndarray) -> Callable[[], Any]:
    """Submit from a new thread; returns ``join()`` giving the logits (or raising the thread's error)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = batcher.frame_logits(engine, frames)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> Any:
        thread.join(60)
        assert not thread.is_alive(), "the request never came back"
        if "error" in box:
            raise box["error"]
        return box["out"]

    return join


def frame_batch(seed: int, h: int = 64, w: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (1, 3, h, w)).astype(np.float32)


def test_a_batch_waits_until_max_wait_after_its_oldest_frame(engines: dict[str, Any]) -> None:
    clock, engine = FakeClock(), Recording(engines["torch"])
    batcher = Batcher(max_batch=4, max_wait_s=0.010, clock=clock)
    first = submit(batcher, engine, frame_batch(0))
    wait_until(lambda: batcher.waiting == 1, what="the first request to wait")
    clock.now = 0.004
    second = submit(batcher, engine, frame_batch(1))
    # Both still wait: the batch is neither full nor 10 ms old (on the clock it reads).
    wait_until(lambda: batcher.waiting == 2, what="the second request to join the first")
    assert engine.sizes == []
    clock.now = 0.010  # the oldest frame's deadline
    batcher.wake()
    a, b = first(), second()
    assert engine.sizes == [2] and batcher.waiting == 0
    torch.testing.assert_close(a, engines["torch"].frame_logits(frame_batch(0)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, engines["torch"].frame_logits(frame_batch(1)), rtol=1e-4, atol=1e-4)
    # The torch engine's logits (tensors) are split into copies: a stream keeps only its own rows alive.
    assert all(out.untyped_storage().nbytes() == out.nbytes for out in (a, b))


def test_a_swap_mid_batch_never_mixes_versions_or_input_sizes(engines: dict[str, Any]) -> None:
    clock = FakeClock()
    v1, v2 = Recording(engines["torch"]), Recording(engines["torch-v2"])
    batcher = Batcher(max_batch=8, max_wait_s=1.0, clock=clock)
    old = [submit(batcher, v1, frame_batch(k)) for k in range(2)]
    wait_until(lambda: batcher.waiting == 2, what="two frames waiting on v1")
    new = submit(batcher, v2, frame_batch(2))  # the manager swapped: this stream's next frame is on v2
    small = submit(batcher, v1, frame_batch(3, 48, 96))  # another input size on v1
    wait_until(lambda: batcher.waiting == 4, what="four frames waiting")
    assert v1.sizes == [] and v2.sizes == []
    clock.now = 1.0
    batcher.wake()
    outs = [join() for join in (*old, new, small)]
    assert sorted(v1.sizes) == [1, 2] and v2.sizes == [1]  # v1 64x128, v1 48x96, v2: three separate calls
    refs = [engines["torch"].frame_logits(frame_batch(0)), engines["torch"].frame_logits(frame_batch(1)),
            engines["torch-v2"].frame_logits(frame_batch(2)), engines["torch"].frame_logits(frame_batch(3, 48, 96))]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_an_engine_error_reaches_every_member_and_the_batcher_goes_on(engines: dict[str, Any]) -> None:
    engine = Recording(engines["torch"], fail_first=True)
    batcher = Batcher(max_batch=2, max_wait_s=FOREVER)
    joins = [submit(batcher, engine, frame_batch(k)) for k in range(2)]
    for join in joins:
        with pytest.raises(RuntimeError, match="device lost"):
            join()
    joins = [submit(batcher, engine, frame_batch(k)) for k in range(2)]
    assert [join().shape for join in joins] == [(1, 7, 8, 16)] * 2
    assert engine.sizes == [2, 2]


def test_batch_max_one_is_the_unbatched_path(engines: dict[str, Any]) -> None:
    engine = Recording(engines["torch"])
    batcher = Batcher()  # max_batch=1
    out = batcher.frame_logits(engine, frame_batch(0))
    assert engine.sizes == [1] and batcher.waiting == 0 and batcher.stats.batches == 1
    torch.testing.assert_close(out, engines["torch"].frame_logits(frame_batch(0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(0)
    with pytest.raises(ValueError, match="max_wait_s"):
        Batcher(2, -1.0)


def test_an_upload_and_a_stream_share_batches(engines: dict[str, Any], synthetic_video, tmp_path: Path) -> None:
    """``segment_video`` (the upload path, its network call in the caller's thread) next to a stream."""
    from service.video_segmenter import segment_video

    def fractions(path: Path) -> np.ndarray:
        doc = json.loads(path.read_text())
        return np.array([[f["class_fractions"][c] for c in sorted(f["class_fractions"])] for f in doc["frames"]])

    engine = Recording(engines["torch"])
    segment_video(engines["torch"], ShiftFlow(), synthetic_video.path, tmp_path / "alone.json", "json")
    stream = clip(8, seed=30, h=64, w=128)
    batcher = Batcher(max_batch=2, max_wait_s=0.02)
    upload = threading.Thread(target=segment_video, args=(LockedEngine(engine, batcher.lock, batcher), ShiftFlow(),
                                                          synthetic_video.path, tmp_path / "shared.json", "json"))
    upload.start()
    results = batched(batcher, engine, [stream])
    upload.join(120)
    assert not upload.is_alive()
    assert_same(results[0], unbatched(engines["torch"], stream))
    np.testing.assert_allclose(fractions(tmp_path / "shared.json"), fractions(tmp_path / "alone.json"), atol=1e-3)
    assert sum(engine.sizes) == 8 + len(synthetic_video.frames)


def test_websocket_streams_are_batched_by_the_server(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Three real websocket clients in lockstep against a live server with ``batch_max=3``: every network
    call is a full batch of the three streams' frames, and each stream gets its own labels, in order."""
    from models.flow import build_flow
    from service.stream_codec import decode_labels, raw_frame
    from tests.service.test_stream import open_stream, reply, start_server

    live, app = start_server(tmp_path, tiny_checkpoint, batch_max=3, batch_wait_ms=10_000)
    streams = [clip(4, seed=40 + k) for k in range(3)]
    model, meta = load_checkpoint(tiny_checkpoint)
    expected = []
    for stream in streams:
        segmenter = StreamSegmenter(TorchEngine(model, meta, "v0001"), build_flow("dis-ultrafast"))
        expected.append([segmenter.step(frame).labels for frame in stream])
    with live as url, ExitStack() as stack:
        sockets = [stack.enter_context(open_stream(url, format="png"))[0] for _ in streams]
        for i in range(4):
            for ws, stream in zip(sockets, streams):
                ws.send(raw_frame(stream[i]))
            for k, ws in enumerate(sockets):
                meta_, blob = reply(ws)
                assert (meta_["frame"], meta_["keyframe"], meta_["dropped"]) == (i, i == 0, 0)
                agree = (decode_labels(blob, "png") == expected[k][i]).mean()
                assert agree > 0.999, f"stream {k} frame {i}: {agree:.4f} of the labels agree"
        stats = app.state.data_plane.batcher.stats
        assert (stats.batches, stats.frames, stats.largest) == (4, 12, 3)
