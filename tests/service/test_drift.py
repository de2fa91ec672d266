"""The drift signal (service/drift.py): pure functions, the monitor on the bundled demo model, and the
stream route feeding ``GET /v1/models/active`` and ``/metrics`` through a real uvicorn."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
import torch

from adaptation.synth import generate_clip
from models.checkpoint import load_checkpoint
from models.config import DEMO_MODEL_DIR
from models.flow import build_flow
from service.drift import DriftMonitor, Ema, class_shares, mean_entropy, total_variation
from service.engine import TorchEngine
from service.stream_segmenter import StreamSegmenter
from service.stream_codec import raw_frame
from tests.service.test_stream import open_stream, reply, start_server

DEMO = DEMO_MODEL_DIR
SIZE = (64, 128)  # generated frames; the demo model resizes them to its 256x512 input


def test_entropy_shares_and_total_variation():
    certain = np.zeros((4, 2, 3), np.float32)
    certain[2] = 50.0
    assert mean_entropy(certain) == pytest.approx(0.0, abs=1e-6)
    assert mean_entropy(np.zeros((4, 2, 3), np.float32)) == pytest.approx(1.0)
    assert class_shares(certain).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert total_variation([1, 0, 0], [0, 0.5, 0.5]) == 1.0 and total_variation([0.5, 0.5], [0.5, 0.5]) == 0.0
    with pytest.raises(ValueError):
        mean_entropy(np.zeros((1, 2, 2)))
    with pytest.raises(ValueError):
        total_variation([1.0], [0.5, 0.5])
    ema = Ema(alpha=0.5)
    ema.update(0.2, np.array([1.0, 0.0]))
    ema.update(0.6, np.array([0.0, 1.0]))
    assert ema.entropy == pytest.approx(0.4) and ema.shares.tolist() == [0.5, 0.5] and ema.frames == 2


def test_monitor_resets_its_reference_on_a_new_version():
    m = DriftMonitor(reference_frames=2, alpha=0.5)
    sid = m.open_stream()
    logits = np.zeros((3, 4, 4), np.float32)
    m.observe(sid, "v1", ["a", "b", "c"], logits)
    assert m.snapshot()["streams"][sid]["class_tv"] is None  # the reference is not complete yet
    m.observe(sid, "v1", ["a", "b", "c"], logits)
    snap = m.snapshot()
    assert snap["reference"]["complete"] and snap["streams"][sid]["class_tv"] == 0.0
    m.observe(sid, "v2", ["a", "b", "c"], logits)
    snap = m.snapshot()
    assert snap["reference"]["version"] == "v2" and snap["reference"]["frames"] == 1
    assert snap["process"]["frames"] == 1 and snap["streams"][sid]["entropy_delta"] is None
    m.close_stream(sid)
    assert m.snapshot()["streams"] == {}


@pytest.fixture(scope="module")
def demo_engine() -> TorchEngine:
    torch.set_num_threads(1)
    model, meta = load_checkpoint(DEMO)
    return TorchEngine(model, meta, version="demo")


def feed(monitor: DriftMonitor, engine: TorchEngine, style: str, seed: int, sid: str | None, frames: int = 6) -> None:
    segmenter = StreamSegmenter(engine, build_flow("none"), SIZE)
    for frame in generate_clip(style, frames=frames, size=SIZE, seed=seed).frames:
        pending = segmenter.advance(frame)
        monitor.observe(sid, pending.model_version, pending.classes, pending.logits)


def test_signal_rises_on_night_and_fog_and_not_on_source(demo_engine):
    monitor = DriftMonitor(reference_frames=6, alpha=0.3)
    feed(monitor, demo_engine, "source", 0, None)  # the reference: the first frames served
    assert monitor.snapshot()["reference"]["complete"]
    signal = {}
    for style in ("source", "night", "fog"):
        sid = monitor.open_stream()
        feed(monitor, demo_engine, style, 1, sid)
        signal[style] = monitor.snapshot()["streams"][sid]
    src = signal["source"]
    assert abs(src["entropy_delta"]) < 0.05 and src["class_tv"] < 0.15, signal
    for style in ("night", "fog"):
        assert signal[style]["entropy_delta"] > src["entropy_delta"] + 0.05, signal
        assert signal[style]["class_tv"] > src["class_tv"] + 0.15, signal


def _metric(text: str, name: str, stream: str) -> float:
    match = re.search(rf'^{name}{{scope="stream",stream="{stream}"}} (\S+)$', text, re.M)
    assert match, f"{name} for {stream} missing from /metrics"
    return float(match.group(1))


def test_stream_route_reports_drift_in_active_model_and_metrics(tmp_path):
    server, app = start_server(tmp_path, DEMO)
    app.state.drift.reference_frames, app.state.drift.alpha = 4, 0.3  # a short reference for the test
    source = generate_clip("source", frames=8, size=SIZE, seed=0).frames
    night = generate_clip("night", frames=6, size=SIZE, seed=1).frames
    with server as url, open_stream(url, format="rle") as (ws_src, _), open_stream(url, format="rle") as (ws_night, _):
        for frame in source:
            ws_src.send(raw_frame(frame))
            reply(ws_src)
        for frame in night:
            ws_night.send(raw_frame(frame))
            reply(ws_night)
        drift = httpx.get(f"{url.replace('ws', 'http', 1)}/v1/models/active", timeout=30).json()["drift"]
        metrics = httpx.get(f"{url.replace('ws', 'http', 1)}/metrics", timeout=30).text
    assert drift["reference"]["complete"] and drift["reference"]["version"] == "v0001"
    assert set(drift["streams"]) == {"s1", "s2"} and drift["process"]["frames"] == 14
    s_src, s_night = drift["streams"]["s1"], drift["streams"]["s2"]
    assert s_night["class_tv"] > s_src["class_tv"] + 0.15 and s_night["entropy_delta"] > s_src["entropy_delta"]
    assert _metric(metrics, "vss_drift_class_tv", "s2") == s_night["class_tv"]
    assert 'vss_drift_entropy{scope="process",stream=""}' in metrics
