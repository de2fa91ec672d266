"""``WS /v1/stream`` against a real uvicorn on loopback: replies, label maps, errors, drops, hot swaps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from tests.service.live import live_server
from service.stream_codec import decode_labels, decode_rle, encode_rle, raw_frame
from tests.waiting import wait_until

FRAME_KEYS = {"type", "frame", "model_version", "latency_ms", "compute_ms", "dropped", "class_fractions",
              "keyframe", "width", "height", "format"}




def start_server(root: Path, checkpoint: Path, **overrides: object):
    """A live server over a fresh registry holding two copies of ``checkpoint`` (v0001 active, v0002)."""
    registry = ModelRegistry(root / "models")
    registry.import_dir(checkpoint, activate=True)
    shutil.copytree(registry.path("v0001"), registry.root / "v0002")
    settings = Settings(_env_file=None, **{
        "model_dir": root / "models", "job_dir": root / "jobs", "cache_dir": root / "cache",
        "buffer_dir": root / "buffer", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
        "device": "cpu", "flow": "dis-ultrafast", "buffer_enabled": False, **overrides})
    app = create_app(settings)
    return live_server(app, "ws", ws_max_size=64 * 2**20), app


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[tuple[str, FastAPI]]:
    """One server for the tests that do not change its state (2 MiB messages, 4096x4096 pixels at most)."""
    server, app = start_server(tmp_path_factory.mktemp("shared"), tiny_checkpoint,
                               ws_max_message_bytes=2 * 2**20, max_width=4096, max_height=4096)
    with server as url:
        yield url, app


@pytest.fixture()
def server(tmp_path: Path, tiny_checkpoint: Path):
    @contextmanager
    def start(**overrides: object) -> Iterator[tuple[str, FastAPI]]:
        live, app = start_server(tmp_path, tiny_checkpoint, **overrides)
        with live as url:
            yield url, app

    return start


def frames(n: int, h: int = 48, w: int = 80) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w + n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[:, i:i + w]) for i in range(n)]  # a pan to the right


@contextmanager
def open_stream(url: str, **config: object) -> Iterator[tuple[ClientConnection, dict]]:
    with connect(f"{url}/v1/stream", max_size=None) as ws:
        ws.send(json.dumps(config))
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready", ready
        yield ws, ready


def reply(ws: ClientConnection) -> tuple[dict, bytes]:
    meta = json.loads(ws.recv(timeout=30))
    assert meta.get("type") == "frame", meta
    blob = ws.recv(timeout=30)
    assert isinstance(blob, bytes)
    return meta, blob


def closed_with(ws: ClientConnection) -> tuple[dict, int]:
    """The error message the server sent and the close code that followed."""
    error = json.loads(ws.recv(timeout=30))
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=30)
    assert error["type"] == "error"
    return error["error"], info.value.rcvd.code


def test_rle_roundtrip() -> None:
    labels = np.random.default_rng(1).integers(0, 7, (13, 17), dtype=np.uint8)
    labels[:5] = 3
    assert np.array_equal(decode_rle(encode_rle(labels)), labels)
    with pytest.raises(ValueError):
        decode_rle(encode_rle(labels)[:-1])


def test_frames_in_every_encoding_get_label_maps(shared) -> None:
    clip = frames(4)
    url, _ = shared
    with open_stream(url, format="png") as (ws, ready):
        assert ready["model_version"] == "v0001" and len(ready["classes"]) == len(ready["palette"]) == 7
        ws.send(cv2.imencode(".jpg", cv2.cvtColor(clip[0], cv2.COLOR_RGB2BGR))[1].tobytes())
        ws.send(cv2.imencode(".png", cv2.cvtColor(clip[1], cv2.COLOR_RGB2BGR))[1].tobytes())
        ws.send(raw_frame(clip[2]))
        for i in range(3):
            meta, blob = reply(ws)
            assert set(meta) == FRAME_KEYS and meta["frame"] == i and meta["keyframe"] == (i == 0)
            assert meta["model_version"] == "v0001" and meta["dropped"] == 0 and meta["latency_ms"] > 0
            assert abs(sum(meta["class_fractions"].values()) - 1.0) < 1e-3
            labels = decode_labels(blob, "png")
            assert labels.shape == (48, 80) == (meta["height"], meta["width"]) and labels.max() < 7

    with open_stream(url, format="rle", size=[24, 40], raw={"width": 80, "height": 48}, collect=False) as (ws, _):
        for frame in clip[:2]:
            ws.send(frame.tobytes())  # headerless raw of the declared size
        for i in range(2):
            meta, blob = reply(ws)
            assert meta["frame"] == i and meta["format"] == "rle"
            assert decode_rle(blob).shape == (24, 40)


@pytest.mark.parametrize("config, payload, close_code, code", [
    ("{not json", None, 1007, "invalid_config"),
    (json.dumps({"format": "gif"}), None, 1007, "invalid_config"),
    (json.dumps({"colour": True}), None, 1007, "invalid_config"),
    (b"\x89PNG", None, 1003, "config_expected"),
    (json.dumps({}), "a text message", 1003, "unexpected_text"),
    (json.dumps({}), b"GIF89a not a supported frame", 1003, "unsupported_frame"),
    (json.dumps({}), b"\xff\xd8\xff\xe0\x00\x10JFIF\x00broken", 1003, "undecodable_frame"),
    (json.dumps({}), b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02garbage",
     1003, "undecodable_frame"),
    (json.dumps({"raw": {"width": 8, "height": 8}}), b"\x00" * 100, 1007, "bad_raw_size"),
    (json.dumps({}), b"RGB3" + (4).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"\x00" * 5,
     1007, "bad_raw_size"),
    (json.dumps({}), b"RGB3" + (5000).to_bytes(4, "little") + (5000).to_bytes(4, "little"), 1008, "frame_too_large"),
    (json.dumps({"raw": {"width": 9000, "height": 8000}}), None, 1007, "invalid_config"),
    (json.dumps({"raw": {"width": 8000, "height": 8000}}), None, 1008, "frame_too_large"),
    (json.dumps({}), b"\x00" * (2 * 2**20 + 1), 1009, "message_too_big"),
    # the label maps a config asks for fit the pixel budget (a 16x16 frame must not cost 8192x8192 x classes)
    (json.dumps({"format": "rle", "size": [8192, 8192]}), None, 1008, "too_many_pixels"),
    ('{"size":' + "[" * 2000, None, 1007, "invalid_config"),  # nested too deeply for the JSON parser
    ('{"size":' + "[" * 5000, None, 1007, "invalid_config"),  # over the config's 4096 characters
])
def test_malformed_input_closes_with_a_precise_code(shared, config, payload, close_code, code) -> None:
    url, _ = shared
    with connect(f"{url}/v1/stream", max_size=None) as ws:
        ws.send(config)
        if payload is not None:
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
            ws.send(payload)
        error, got = closed_with(ws)
    assert (got, error["code"]) == (close_code, code), error
    with open_stream(url) as (ws2, _):  # the server is still healthy
        ws2.send(raw_frame(frames(1)[0]))
        assert reply(ws2)[0]["frame"] == 0


def test_overload_drops_the_oldest_frames(server) -> None:
    clip = frames(40, 96, 160)
    with server(ws_queue_size=1) as (url, app):
        with open_stream(url, format="rle") as (ws, _):
            for frame in clip:
                ws.send(raw_frame(frame))
            seen = []
            while not seen or seen[-1]["frame"] != len(clip) - 1:
                seen.append(reply(ws)[0])
        assert seen[-1]["dropped"] > 0, "a queue of 1 must have dropped some of 40 back-to-back frames"
        assert len(seen) + seen[-1]["dropped"] == len(clip)  # every frame was answered or counted as dropped
        indices = [m["frame"] for m in seen]
        assert indices == sorted(indices)  # the freshest frames are answered, in order
        metrics = app.state.metrics.render().decode()
        assert f'vss_frames_dropped_total{{reason="stale"}} {seen[-1]["dropped"]}.0' in metrics


def test_hot_swap_makes_the_next_frame_a_keyframe(server) -> None:
    clip = frames(4)
    with server() as (url, app):
        with open_stream(url, format="png") as (ws, _):
            for i in range(2):
                ws.send(raw_frame(clip[i]))
                meta, _ = reply(ws)
                assert (meta["model_version"], meta["keyframe"]) == ("v0001", i == 0)
            app.state.engine_manager.activate("v0002")
            ws.send(raw_frame(clip[2]))
            meta, _ = reply(ws)
            assert (meta["frame"], meta["model_version"], meta["keyframe"]) == (2, "v0002", True)
            ws.send(raw_frame(clip[3]))
            assert reply(ws)[0]["keyframe"] is False


def test_client_leaving_mid_stream_is_a_clean_close(shared) -> None:
    url, app = shared
    for _ in range(2):
        with open_stream(url, format="png") as (ws, _):
            for frame in frames(8, 96, 160):
                ws.send(raw_frame(frame))
        # leaving the block closes the socket while frames are still queued or being segmented
    wait_until(lambda: "vss_stream_sessions 0.0" in app.state.metrics.render().decode(), 10,
               "the stream sessions to be released")
    assert 'route="/v1/stream",status="1011"' not in app.state.metrics.render().decode()
    with open_stream(url) as (ws, _):
        ws.send(raw_frame(frames(1)[0]))
        assert reply(ws)[0]["frame"] == 0


def test_protocol_is_documented_in_openapi(shared) -> None:
    url, _ = shared
    http = url.replace("ws://", "http://")
    r = httpx.get(f"{http}/v1/stream")
    assert r.status_code == 426 and r.json()["error"]["code"] == "upgrade_required"
    spec = httpx.get(f"{http}/openapi.json").json()
    description = spec["paths"]["/v1/stream"]["get"]["description"]
    assert "RLE1" in description and "1008" in description
    assert "/v1/segment" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    with connect(f"{url}/stream", max_size=None) as ws:  # the unversioned alias
        ws.send(json.dumps({"format": "rle"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"


def test_a_server_side_failure_closes_with_1011(server) -> None:
    with server() as (url, app):
        engine = app.state.engine_manager.current()

        def broken(frames):
            raise RuntimeError("simulated engine failure")

        engine.frame_logits = broken
        with open_stream(url) as (ws, _):
            ws.send(raw_frame(frames(1)[0]))
            error, code = closed_with(ws)
        assert (code, error["code"]) == (1011, "internal_error") and "simulated" not in error["message"]
        del engine.frame_logits  # the class method again
        with open_stream(url) as (ws, _):
            ws.send(raw_frame(frames(1)[0]))
            assert reply(ws)[0]["frame"] == 0
