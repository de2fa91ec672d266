"""Per-domain versions and routing (service/routing.py) through a real server: websockets, uploads, retire."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from adaptation.synth.generator import generate_clip
from models.signature import LENGTH, VERSION, clip_signature
from service.app import create_app
from service.registry import ModelRegistry
from service.registry_api import Registry
from service.domains import Domain, Route, RouteTable, choose, domain_of
from service.settings import Settings
from service.video_io import VideoWriter
from tests.service.live import live_server
from tests.service.test_stream import open_stream, reply
from tests.waiting import wait_until

SIZE = (64, 128)  # the tiny checkpoint's input size


def style_frames(style: str, n: int, seed: int) -> np.ndarray:
    return generate_clip(style, frames=n, size=SIZE, seed=seed).frames


def domain_checkpoint(tiny: Path, out: Path, name: str, style: str) -> Path:
    """A copy of the tiny checkpoint whose meta.json names a domain with the signature of ``style``."""
    shutil.copytree(tiny, out)
    meta = json.loads((out / "meta.json").read_text())
    reference = np.concatenate([style_frames(style, 4, seed) for seed in (0, 1)])
    meta["domain"] = {"signature": [float(v) for v in clip_signature(reference)], "signature_version": VERSION,
                      "name": name, "clips": 2}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def publish_domains(registry: Registry, tiny: Path, tmp: Path) -> None:
    """v0001: the base (active, no domain); v0002: fog; v0003: night."""
    registry.import_dir(tiny, activate=True)
    assert registry.import_dir(domain_checkpoint(tiny, tmp / "fog", "fog", "fog")) == "v0002"
    assert registry.import_dir(domain_checkpoint(tiny, tmp / "night", "night", "night")) == "v0003"


def settings_for(root: Path, model_dir: object, **overrides: object) -> Settings:
    return Settings(_env_file=None, **{
        "model_dir": model_dir, "job_dir": root / "jobs", "cache_dir": root / "cache", "buffer_dir": root / "buffer",
        "demo_model": None, "registry_poll_ms": 50, "route_poll_s": 0.1, "intra_op_threads": 1, "device": "cpu",
        "flow": "dis-ultrafast", "buffer_enabled": False, **overrides})


def raw_frame(frame: np.ndarray) -> bytes:
    h, w = frame.shape[:2]
    return b"RGB3" + w.to_bytes(4, "little") + h.to_bytes(4, "little") + frame.tobytes()


def stream(url: str, frames: np.ndarray) -> list[dict]:
    out = []
    with open_stream(url, format="rle") as (ws, _):
        for f in frames:
            ws.send(raw_frame(f))
            out.append(reply(ws)[0])
    return out


def routes_loaded(app: FastAPI, n: int) -> bool:
    return len(app.state.routes.table.routes) == n


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[tuple[str, FastAPI]]:
    root = tmp_path_factory.mktemp("routing")
    publish_domains(ModelRegistry(root / "models"), tiny_checkpoint, root)
    app = create_app(settings_for(root, root / "models"))
    with live_server(app, "ws", ws_max_size=64 * 2**20) as url:
        wait_until(lambda: routes_loaded(app, 2), 60, "two domain versions loaded")
        yield url, app


def test_choose_rule() -> None:
    def sig(v: float) -> np.ndarray:
        return np.full(LENGTH, v, np.float32)

    table = RouteTable("v0001", None, (Route("v0002", Domain("a", 1, sig(0.0)), None),  # type: ignore[arg-type]
                                       Route("v0003", Domain("b", 1, sig(1.0)), None)))  # type: ignore[arg-type]
    unit = 0.01  # 1 signature unit of entry 0 in SCALE is >= 0.01: sig(0.01) is ~1 unit away from sig(0)
    assert choose(table, sig(0.0), None, 2.5, 0.25).route.version == "v0002"
    assert choose(table, sig(1.0), None, 2.5, 0.25).route.version == "v0003"
    assert choose(table, sig(0.5), None, 2.5, 0.25).route is None  # far from both: the base
    near_a = choose(table, sig(unit), None, 2.5, 0.0)
    assert near_a.route.version == "v0002" and near_a.distance_base is None and near_a.distance_served > 0
    # a known base signature that is nearer than every domain wins
    based = RouteTable("v0001", sig(0.004), table.routes)
    assert choose(based, sig(0.005), None, 2.5, 0.0).route is None
    # hysteresis: the version serving now stays unless the other is nearer by the margin
    mid = sig(0.5)
    close = RouteTable("v0001", None, (Route("v0002", Domain("a", 1, sig(0.497)), None),  # type: ignore[arg-type]
                                       Route("v0003", Domain("b", 1, sig(0.505)), None)))  # type: ignore[arg-type]
    assert choose(close, mid, "v0003", 2.5, 0.25).route.version == "v0003"
    assert choose(close, mid, "v0003", 2.5, 0.0).route.version == "v0002"


def test_domain_meta_is_validated() -> None:
    good = {"domain": {"signature": [0.1] * LENGTH, "signature_version": VERSION, "name": "fog", "clips": 3}}
    assert domain_of(good) is not None and domain_of(good).name == "fog"
    assert domain_of({}) is None
    assert domain_of({"domain": {**good["domain"], "signature_version": VERSION + 1}}) is None
    assert domain_of({"domain": {**good["domain"], "signature": [0.1] * (LENGTH - 1)}}) is None
    assert domain_of({"domain": {**good["domain"], "signature": ["x"] * LENGTH}}) is None


def test_each_style_is_served_by_its_domain_version(routed) -> None:
    url, app = routed
    assert [m["model_version"] for m in stream(url, style_frames("fog", 3, 2))] == ["v0002"] * 3
    assert [m["model_version"] for m in stream(url, style_frames("night", 3, 2))] == ["v0003"] * 3
    # source frames match no domain version: the base (its signature is unknown: the threshold decides)
    assert [m["model_version"] for m in stream(url, style_frames("source", 3, 2))] == ["v0001"] * 3
    http = url.replace("ws://", "http://")
    listing = httpx.get(f"{http}/v1/models").json()
    by_version = {v["version"]: v for v in listing["versions"]}
    assert by_version["v0001"]["domain"] is None and not by_version["v0001"]["routable"]
    assert by_version["v0002"]["domain"]["name"] == "fog" and by_version["v0002"]["routable"]
    assert by_version["v0003"]["routed"] and not by_version["v0003"]["retired"]
    metrics = httpx.get(f"{http}/metrics").text
    assert 'vss_route_frames_total{version="v0002"}' in metrics and "vss_route_versions 2.0" in metrics


def test_a_stream_that_changes_domain_switches_at_a_keyframe(routed) -> None:
    url, app = routed
    frames = np.concatenate([style_frames("fog", 4, 3), style_frames("night", 48, 3)])  # a signature every 4th
    http = url.replace("ws://", "http://")
    with open_stream(url, format="rle") as (ws, _):
        replies = []
        for i, f in enumerate(frames):
            ws.send(raw_frame(f))
            replies.append(reply(ws)[0])
            if i == 4:  # while the stream is open, /v1/models/active shows which version serves it
                streams = httpx.get(f"{http}/v1/models/active").json()["routing"]["streams"]
                assert [s["version"] for s in streams.values()] == ["v0002"], streams
                assert all(s["distance_served"] is not None for s in streams.values())
    versions = [m["model_version"] for m in replies]
    assert versions[:4] == ["v0002"] * 4 and versions[-1] == "v0003", versions
    reference = httpx.get(f"{http}/v1/models/active").json()["drift"]["reference"]
    assert reference is None or reference["version"] == "v0001"  # domain-served frames stay out of the base's drift
    for prev, cur in zip(replies, replies[1:]):  # every change of version is a keyframe, and only those are
        assert cur["keyframe"] == (cur["model_version"] != prev["model_version"]), (prev, cur)


def test_an_upload_is_routed_by_its_first_frames(routed, tmp_path: Path) -> None:
    url, _ = routed
    path = tmp_path / "night.mp4"
    with VideoWriter(path, 10.0, SIZE[1], SIZE[0], crf=18) as writer:
        for frame in style_frames("night", 6, 4):
            writer.write(frame)
    http = url.replace("ws://", "http://")
    with open(path, "rb") as f:
        r = httpx.post(f"{http}/v1/segment?format=json", files={"video": ("night.mp4", f, "video/mp4")}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "v0003"


def test_retire_stops_routing_and_unretire_brings_it_back(tmp_path: Path, tiny_checkpoint: Path) -> None:
    publish_domains(ModelRegistry(tmp_path / "models"), tiny_checkpoint, tmp_path)
    app = create_app(settings_for(tmp_path, tmp_path / "models"))
    with live_server(app, "ws", ws_max_size=64 * 2**20) as url:
        wait_until(lambda: routes_loaded(app, 2), 60, "two domain versions loaded")
        http = url.replace("ws://", "http://")
        fog = style_frames("fog", 2, 5)
        assert stream(url, fog)[0]["model_version"] == "v0002"
        r = httpx.post(f"{http}/v1/models/v0002/retire")
        assert r.status_code == 200 and r.json()["retired"] and not r.json()["routable"], r.text
        assert (tmp_path / "models" / "RETIRED" / "v0002").is_file()
        assert [m["model_version"] for m in stream(url, fog)] == ["v0001"] * 2
        assert httpx.post(f"{http}/v1/models/v0009/retire").status_code == 404
        assert httpx.post(f"{http}/v1/models/nope/retire").status_code == 422
        r = httpx.post(f"{http}/v1/models/v0002/unretire")
        assert r.status_code == 200 and r.json()["routable"], r.text
        assert stream(url, fog)[0]["model_version"] == "v0002"
        from vss_client import Client  # the Python client does the same

        with Client(http, api_key=None) as client:
            assert client.models.retire("v0003")["retired"] and not client.models.retire("v0003", False)["retired"]


def test_without_domain_versions_nothing_is_computed(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    app = create_app(settings_for(tmp_path, tmp_path / "models"))
    with live_server(app, "ws", ws_max_size=64 * 2**20) as url:
        replies = stream(url, style_frames("fog", 3, 2))
        assert [m["model_version"] for m in replies] == ["v0001"] * 3
        assert [m["keyframe"] for m in replies] == [True, False, False]
        assert not app.state.routes.table.active
        assert app.state.routes.process.frames == 0  # no signature was computed
        active = httpx.get(url.replace("ws://", "http://") + "/v1/models/active").json()
        assert active["routing"]["routes"] == [] and active["drift"]["process"]["signature_distance"] is None


def test_a_server_side_source_is_routed_too(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from tests.service.sources_support import create, vss_server, wait_state, write_mp4

    publish_domains(ModelRegistry(tmp_path / "models"), tiny_checkpoint, tmp_path)
    with vss_server(tmp_path, tiny_checkpoint, route_poll_s=0.1) as server, server.client() as client:
        wait_until(lambda: routes_loaded(server.app, 2), 60, "two domain versions loaded")
        write_mp4(tmp_path / "files" / "night.mp4", list(style_frames("night", 6, 7)))
        source = create(client, "file:night.mp4")
        done = wait_state(client, source["id"], {"stopped", "failed"})
        assert done["state"] == "stopped" and done["frames_segmented"] > 0, done
        routing = client.get("/v1/models/active").json()["routing"]
        assert routing["frames_by_version"] == {"v0003": done["frames_segmented"]}, routing


def test_cli_lists_domains_and_retires(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    from service.cli import main

    registry = ModelRegistry(tmp_path / "models")
    publish_domains(registry, tiny_checkpoint, tmp_path)
    assert main(["models", "--model-dir", str(registry.root), "retire", "v0002"]) == 0
    assert registry.retired() == {"v0002"}
    assert main(["models", "--model-dir", str(registry.root), "list"]) == 0
    table = capsys.readouterr().out
    assert "fog (2 clips) retired" in table and "night (2 clips)" in table
    assert main(["models", "--model-dir", str(registry.root), "unretire", "v0002"]) == 0
    assert registry.retired() == set()
    assert main(["models", "--model-dir", str(registry.root), "retire", "v0042"]) == 2


def test_a_base_with_its_own_signature_keeps_its_style_and_reports_the_distance(tmp_path: Path,
                                                                                tiny_checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    registry.import_dir(domain_checkpoint(tiny_checkpoint, tmp_path / "base", "source", "source"), activate=True)
    registry.import_dir(domain_checkpoint(tiny_checkpoint, tmp_path / "recolor", "recolor", "recolor"))
    # max_distance 3.5: source frames are within it of the recolor version (~3 apart), so only the rule
    # "nearer than the base's own signature" keeps them on the base
    app = create_app(settings_for(tmp_path, tmp_path / "models", route_sample_every=1, route_max_distance=3.5))
    with live_server(app, "ws", ws_max_size=64 * 2**20) as url:
        wait_until(lambda: routes_loaded(app, 1), 60, "the recolor version loaded")
        assert app.state.routes.table.base_signature is not None
        assert [m["model_version"] for m in stream(url, style_frames("recolor", 3, 2))] == ["v0002"] * 3
        http = url.replace("ws://", "http://")
        with open_stream(url, format="rle") as (ws, _):
            for f in style_frames("source", 3, 2):
                ws.send(raw_frame(f))
                assert reply(ws)[0]["model_version"] == "v0001"
            active = httpx.get(f"{http}/v1/models/active").json()
            (state,) = active["routing"]["streams"].values()
            assert state["version"] == "v0001" and state["distance_base"] < 2.0 and state["distance_served"] is None
            (drift,) = active["drift"]["streams"].values()
            assert drift["signature_distance"] == state["distance_base"]
            assert active["drift"]["process"]["signature_distance"] is not None
        listing = httpx.get(f"{http}/v1/models").json()["versions"]
        assert listing[1]["domain"]["distance_to_base"] > 2.0 and not listing[0]["routable"]
        assert "vss_domain_distance{" in httpx.get(f"{http}/metrics").text


def test_the_base_signature_comes_from_stored_source_statistics(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Issue 13 item 4 stores source statistics (with a signature) beside a checkpoint's weights; a base
    without a ``domain`` meta takes its signature from them."""
    from adaptation.source_stats import compute_source_stats
    from models.checkpoint import add_source_stats, load_checkpoint, read_meta
    from service.domains import base_signature

    ckpt = tmp_path / "with-stats"
    shutil.copytree(tiny_checkpoint, ckpt)
    clip = generate_clip("source", frames=4, size=SIZE, seed=0)
    stats = compute_source_stats(load_checkpoint(ckpt)[0], list(clip.frames), list(clip.labels))
    add_source_stats(ckpt, stats)
    vector = base_signature(read_meta(ckpt), ckpt)
    assert vector is not None and np.allclose(vector, stats.signature)
    assert base_signature(read_meta(tiny_checkpoint), tiny_checkpoint) is None
