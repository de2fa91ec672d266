"""vss_client.stream against real servers: results in order, both label encodings, frames in flight,
protocol errors, and a server restart (close 1012) that the stream rides through."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.registry import ModelRegistry
from tests.client.servers import Server, serve, settings_for
from vss_client import Client, StreamError, overlay


def test_stream_answers_every_frame_in_order(server: Server, synthetic_video) -> None:
    frames = list(synthetic_video.frames)
    jpeg = cv2.imencode(".jpg", frames[0][..., ::-1])[1].tobytes()
    with Client(server.url) as vss:
        with vss.stream([*frames, jpeg], format="rle") as stream:
            rle = list(stream)
            assert stream.classes[0] == "road" and len(stream.palette) == 7 and stream.reconnects == 0
        png = list(vss.stream(frames, format="png", size=(32, 64)))
    assert [r.index for r in rle] == list(range(7)) and [r.index for r in png] == list(range(6))
    assert rle[0].keyframe and not any(r.keyframe for r in rle[1:])
    assert all(r.labels.shape == (64, 128) and r.labels.dtype == np.uint8 for r in rle)
    assert all(r.labels.shape == (32, 64) for r in png)
    assert rle[0].model_version == "v0001" and rle[0].latency_ms >= rle[0].compute_ms > 0
    assert sum(rle[0].class_fractions.values()) == pytest.approx(1, abs=1e-3)
    fractions = np.bincount(rle[2].labels.ravel(), minlength=7) / rle[2].labels.size
    assert fractions == pytest.approx([rle[2].class_fractions[c] for c in stream.classes], abs=1e-3)
    drawn = rle[2].overlay(frames[2], alpha=1.0)
    assert np.array_equal(drawn, overlay(frames[2], rle[2].labels, stream.palette, 1.0))
    assert np.array_equal(drawn[0, 0], stream.palette[rle[2].labels[0, 0]])


def test_frames_in_flight_may_be_dropped_but_stay_in_order(server: Server, synthetic_video) -> None:
    frames = [synthetic_video.frames[i % 6] for i in range(24)]
    with Client(server.url) as vss:
        results = list(vss.stream(frames, in_flight=8, collect=False))
    indices = [r.index for r in results]
    assert indices == sorted(set(indices)) and indices[-1] == 23  # the newest frame is always answered
    assert len(results) + results[-1].dropped == 24  # every frame is answered or counted as dropped


def test_protocol_errors_raise_stream_error(server: Server, synthetic_video) -> None:
    with Client(server.url) as vss:
        with pytest.raises(StreamError) as bad_frame:
            list(vss.stream([synthetic_video.frames[0], b"GIF89a not a frame"]))
        with pytest.raises(TypeError, match="a frame must be"):
            list(vss.stream([object()]))  # type: ignore[list-item]
        with pytest.raises(ValueError, match="'png' or 'rle'"):
            vss.stream([], format="gif")
    e = bad_frame.value
    assert (e.close_code, e.code) == (1003, "unsupported_frame") and "JPEG, PNG" in e.message


def test_stream_reconnects_after_a_server_restart(tmp_path: Path, tiny_checkpoint: Path, synthetic_video) -> None:
    """The server drains as on SIGTERM ("draining", close 1012) between two frames; a new one comes up on
    the same port while the stream retries; the stream resends the frame in flight, gets a keyframe and goes on."""
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    settings = settings_for(tmp_path, worker="off")
    restarted = threading.Event()
    second_up = threading.Event()
    stop_second = threading.Event()
    first = serve(settings)
    live = first.__enter__()

    def run_second() -> None:
        with serve(settings, port=live.port):
            second_up.set()
            stop_second.wait(120)

    def frames() -> Iterator[np.ndarray]:
        for i in range(8):
            if i == 4:  # frames 0-3 answered by the first server: restart it
                first.__exit__(None, None, None)
                threading.Thread(target=run_second, daemon=True).start()
                restarted.set()
            yield synthetic_video.frames[i % 6]

    try:
        with Client(live.url) as vss:
            stream = vss.stream(frames(), reconnect_timeout=120)
            results = list(stream)
        assert restarted.is_set() and second_up.is_set()
        assert [r.index for r in results] == list(range(8)) and stream.reconnects == 1
        # "draining" when the reply was being awaited; "closed" when the next frame's send met the closed socket
        assert [d.close_code for d in stream.disconnects] == [1012]
        assert stream.disconnects[0].code in ("draining", "closed")
        assert [r.keyframe for r in results] == [True, False, False, False, True, False, False, False]
    finally:
        stop_second.set()
        if not restarted.is_set():
            first.__exit__(None, None, None)


def test_no_reconnect_when_turned_off(tmp_path: Path, tiny_checkpoint: Path, synthetic_video) -> None:
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    ctx = serve(settings_for(tmp_path, worker="off"), drain=False)
    live = ctx.__enter__()

    def frames() -> Iterator[np.ndarray]:
        yield synthetic_video.frames[0]
        ctx.__exit__(None, None, None)
        yield synthetic_video.frames[1]

    with Client(live.url) as vss, pytest.raises(StreamError) as closed:
        list(vss.stream(frames(), reconnect=False))
    assert closed.value.close_code == 1012


def test_async_stream_reconnects_after_a_server_restart(tmp_path: Path, tiny_checkpoint: Path,
                                                        synthetic_video) -> None:
    import asyncio

    from vss_client import AsyncClient

    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    settings = settings_for(tmp_path, worker="off")
    stop_second = threading.Event()
    first = serve(settings)
    live = first.__enter__()
    stopped = False

    def run_second() -> None:
        with serve(settings, port=live.port):
            stop_second.wait(120)

    async def frames():  # an async iterable of frames
        nonlocal stopped
        for i in range(6):
            if i == 3:
                await asyncio.to_thread(first.__exit__, None, None, None)
                stopped = True
                threading.Thread(target=run_second, daemon=True).start()
            yield synthetic_video.frames[i]

    async def main() -> tuple[list[int], list[bool], int]:
        async with AsyncClient(live.url) as vss:
            stream = vss.stream(frames(), format="png", reconnect_timeout=120)
            results = [r async for r in stream]
            return [r.index for r in results], [r.keyframe for r in results], stream.reconnects

    try:
        indices, keyframes, reconnects = asyncio.run(main())
        assert indices == list(range(6)) and reconnects == 1
        assert keyframes == [True, False, False, True, False, False]
    finally:
        stop_second.set()
        if not stopped:
            first.__exit__(None, None, None)
