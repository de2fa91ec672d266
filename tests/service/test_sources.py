"""Server-side sources against real servers on loopback: a live vss (uvicorn) pulling from a local
HTTP server (an MP4, an HLS rendition, redirects, non-video data) and from files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.sources.fetch import open_container
from service.sources.policy import SourcePolicy
from tests.conftest import SyntheticVideo
from tests.service.sources_support import (FRAME_KEYS, Server, clip_frames, create, decoded_frames, file_server,
                                           frames_from, next_message, source_threads, state_of, subscribe,
                                           vss_server, wait_state, write_hls, write_mp4)
from tests.waiting import wait_until

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, synthetic_video: SyntheticVideo) -> Path:
    """Served files: a 4 s MP4, an HLS rendition of it, a text file named like a video, a bad playlist."""
    root = tmp_path_factory.mktemp("media")
    frames = clip_frames(synthetic_video.frames, 40)
    write_mp4(root / "clip.mp4", frames)
    write_hls(root / "hls", frames[:24])
    (root / "notvideo.mp4").write_text("<html><body>this is not a video</body></html>\n" * 50)
    (root / "list.ffconcat").write_text("ffconcat version 1.0\nfile clip.mp4\n")  # a demuxer left out
    (root / "evil.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n"
                                    "http://169.254.169.254/latest/meta-data/x.ts\n#EXT-X-ENDLIST\n")
    return root


@pytest.fixture(scope="module")
def http_media(media: Path) -> Iterator[tuple[str, list[str]]]:
    with file_server(media) as served:
        yield served


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Server]:
    with vss_server(tmp_path_factory.mktemp("vss"), tiny_checkpoint, sources_max=4,
                    sources_reconnect_attempts=2) as live:
        yield live


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    """A client; every source left at the end of a test is deleted (and must stop)."""
    with server.client() as c:
        yield c
        for source in c.get("/v1/sources").json()["sources"]:
            assert c.delete(f"/v1/sources/{source['id']}").status_code == 200


def test_http_source_is_segmented_and_streamed_to_subscribers(server: Server, client: httpx.Client,
                                                              http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    source = create(client, f"{base}/clip.mp4", name="driveway")
    assert source["state"] in ("connecting", "running") and source["name"] == "driveway"
    with subscribe(server, source["id"], "rle") as (ws, ready):
        assert ready["source"] == source["id"] and len(ready["classes"]) == NUM_CLASSES
        replies = frames_from(ws, 8)
    indices = [meta["frame"] for meta, _ in replies]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    for meta, labels in replies:
        assert set(meta) == FRAME_KEYS and meta["format"] == "rle" and meta["model_version"] == "v0001"
        assert labels.shape == (meta["height"], meta["width"]) == (64, 128)
        assert labels.max() < NUM_CLASSES
        assert sum(meta["class_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    assert not all(meta["keyframe"] for meta, _ in replies)  # streaming reuse: cached t-1 logits
    state = state_of(client, source["id"])
    assert state["state"] == "running" and state["frames_segmented"] >= 8 and state["width"] == 128
    assert state["source_fps"] == pytest.approx(10.0)

    stopped = client.delete(f"/v1/sources/{source['id']}").json()
    assert stopped["state"] == "stopped"
    assert source_threads(source["id"]) == []  # both threads ended
    assert client.get(f"/v1/sources/{source['id']}").status_code == 404
    assert client.delete(f"/v1/sources/{source['id']}").status_code == 404


def test_mjpeg_over_http_like_a_camera(client: httpx.Client, http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    source = create(client, f"{base}/mjpeg", on_end="stop")
    done = wait_state(client, source["id"], {"stopped", "failed"})
    assert done["state"] == "stopped" and done["frames"] == 20 and (done["width"], done["height"]) == (80, 48), done
    assert done["frames_segmented"] + done["dropped"] == 20 and done["frames_segmented"] > 0
    # by default a stream without a duration is live: its end is a drop, and the source reconnects
    live = create(client, f"{base}/mjpeg")
    again = wait_until(lambda: (s := state_of(client, live["id"]))["reconnects"] >= 1 and s["frames"] > 20 and s,
                       60, "the MJPEG source to reconnect and go on")
    assert again["state"] in ("running", "reconnecting") and again["error"] == "end of stream"


def test_file_source_runs_to_its_end_with_a_disk_sink(server: Server, client: httpx.Client, media: Path,
                                                      synthetic_video: SyntheticVideo) -> None:
    write_mp4(server.root / "files" / "short.mp4", list(synthetic_video.frames))
    source = create(client, "file:short.mp4", sinks=["disk"], segment_s=0.5)
    done = wait_state(client, source["id"], {"stopped", "failed"})
    assert done["state"] == "stopped" and done["error"] == "end of stream", done
    assert done["frames"] == len(synthetic_video.frames)
    assert done["frames_segmented"] + done["dropped"] == done["frames"]
    disk = Path(done["sinks"]["disk"]["dir"])
    segments = sorted(disk.glob("seg-*.mp4"))
    assert segments and done["sinks"]["disk"]["segments"] == len(segments)
    assert sum(decoded_frames(str(p)) for p in segments) == done["frames_segmented"]
    assert not list(disk.glob(".*"))  # no temp files left
    drift = client.get("/v1/models/active").json()["drift"]  # service/drift.py saw its frames, then let go
    assert drift["process"]["frames"] >= done["frames_segmented"] and f"source:{source['id']}" not in drift["streams"]


def test_hls_source_with_an_hls_sink_served_by_the_app(server: Server, client: httpx.Client,
                                                       http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    source = create(client, f"{base}/hls/index.m3u8", sinks=["hls"], segment_s=0.5, realtime=False)
    done = wait_state(client, source["id"], {"stopped", "failed"})
    assert done["state"] == "stopped" and done["frames"] == 24, done
    playlist = client.get(done["sinks"]["hls"]["playlist"])
    assert playlist.status_code == 200 and playlist.headers["content-type"] == "application/vnd.apple.mpegurl"
    assert playlist.text.startswith("#EXTM3U") and "#EXT-X-ENDLIST" in playlist.text
    # a real HLS client (FFmpeg's demuxer) plays the overlay back from the app
    played = decoded_frames(f"{server.url}{done['sinks']['hls']['playlist']}")
    assert played == done["frames_segmented"] > 0
    assert client.get(f"/v1/sources/{source['id']}/hls/../../x").status_code == 404
    assert client.get(f"/v1/sources/{source['id']}/hls/seg-999999.ts").status_code == 404
    client.delete(f"/v1/sources/{source['id']}")
    assert not (server.root / "out" / source["id"] / "hls").exists()  # DELETE frees the HLS files


def test_a_name_connects_to_the_checked_address(http_media: tuple[str, list[str]], media: Path) -> None:
    """DNS rebinding: the fetcher connects to the address the policy checked, never resolving again."""
    base, hosts = http_media
    port = int(base.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a rebinding resolver: second answer is evil
    settings = type("S", (), {"sources_allowed_schemes": ["http"], "sources_allowed_hosts": ["camera.test"],
                              "sources_file_dir": None})
    policy = SourcePolicy.from_settings(settings, lambda host, p: next(answers))
    target = policy.check(f"http://camera.test:{port}/clip.mp4")  # "camera.test" exists in no real DNS
    with open_container(target, policy, 5, 5) as container:
        assert sum(1 for _ in container.decode(video=0)) == 40
    assert hosts[-1] == f"camera.test:{port}"  # the Host header names the host, the socket went to 127.0.0.1


def test_an_mp4_with_its_index_at_the_end_is_read_by_range_requests(media: Path,
                                                                   http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    # noise compresses badly: the file is far larger than FFmpeg's read buffer, so reading it straight
    # through cannot reach the index at its end and come back (verified: without ranges it is invalid data)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(9)]
    with av.open(str(media / "moov-last.mp4"), "w", format="mp4") as out:  # no faststart: the index comes last
        stream = out.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = 240, 320, "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    data = (media / "moov-last.mp4").read_bytes()
    assert data.find(b"moov") > data.find(b"mdat") > 0 and len(data) > 200_000
    settings = type("S", (), {"sources_allowed_schemes": ["http"], "sources_allowed_hosts": ["127.0.0.1"],
                              "sources_file_dir": None})
    policy = SourcePolicy.from_settings(settings)
    with open_container(policy.check(f"{base}/ranged/moov-last.mp4"), policy, 5, 5) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9


def test_non_video_unreachable_and_missing_urls_end_with_a_reason(server: Server, client: httpx.Client,
                                                                  http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    reconnects_before = metric(client, "vss_source_reconnects_total")
    bad = create(client, f"{base}/notvideo.mp4")
    concat = create(client, f"{base}/list.ffconcat")
    missing = create(client, f"{base}/missing.mp4")
    closed = create(client, "http://127.0.0.1:9/clip.mp4")  # discard port: nothing listens
    failed = wait_state(client, bad["id"], {"failed"})
    assert "not a video" in failed["error"], failed
    failed = wait_state(client, concat["id"], {"failed"})
    assert "not a video format sources read" in failed["error"], failed
    failed = wait_state(client, missing["id"], {"failed"})
    assert "HTTP 404" in failed["error"], failed
    failed = wait_state(client, closed["id"], {"failed"})
    assert failed["reconnects"] == 2 and "gave up after 2 reconnects" in failed["error"], failed
    assert "refused" in failed["error"].lower()
    assert metric(client, 'vss_sources{state="failed"}') == 4
    assert metric(client, "vss_source_reconnects_total") == reconnects_before + 2


def metric(client: httpx.Client, series: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} is not exported")


def test_refusals_inside_a_source_redirects_and_playlists(server: Server, client: httpx.Client,
                                                          http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    redirect = create(client, f"{base}/redirect?to=http://169.254.169.254/latest/meta-data/")
    playlist = create(client, f"{base}/evil.m3u8")
    failed = wait_state(client, redirect["id"], {"failed"})
    assert "redirect refused" in failed["error"] and "link-local" in failed["error"], failed
    failed = wait_state(client, playlist["id"], {"failed"})
    assert "refused inside the source" in failed["error"] and "169.254.169.254" in failed["error"], failed


@pytest.mark.parametrize("url, status, message", [
    ("http://169.254.169.254/latest/meta-data/", 403, "link-local"),
    ("rtsp://[fd00:ec2::254]/x", 403, "cloud-metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", 403, "cloud-metadata host"),
    ("rtsp://10.1.2.3/cam", 403, "not in VSS_SOURCES_ALLOWED_HOSTS"),
    ("ftp://127.0.0.1/x.mp4", 403, "scheme 'ftp' is not allowed"),
    ("file:///etc/passwd", 403, "outside VSS_SOURCES_FILE_DIR"),
    ("file:escape.mp4", 403, "outside VSS_SOURCES_FILE_DIR"),  # a symbolic link out of the directory
    ("file:nothing.mp4", 422, "no such file"),
    ("127.0.0.1/cam", 422, "no scheme"),
    ("http://127.0.0.1:99999/x", 422, "port"),
])
def test_refused_and_malformed_urls_answer_4xx_with_the_reason(server: Server, client: httpx.Client, url: str,
                                                               status: int, message: str, tmp_path: Path) -> None:
    escape = server.root / "files" / "escape.mp4"
    if not escape.is_symlink():
        (tmp_path / "outside.mp4").write_bytes(b"x")
        escape.symlink_to(tmp_path / "outside.mp4")
    response = client.post("/v1/sources", json={"url": url})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert client.get("/v1/sources").json()["sources"] == []


def test_bad_options_are_422(client: httpx.Client, http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    for body in ({"url": f"{base}/clip.mp4", "sinks": ["rtmp"]}, {"url": f"{base}/clip.mp4", "size": [0, 5]},
                 {"url": f"{base}/clip.mp4", "unknown": 1}, {"url": f"{base}/clip.mp4", "segment_s": 0},
                 {"name": "no url"}):
        response = client.post("/v1/sources", json=body)
        assert response.status_code == 422, (body, response.text)


def test_max_sources_is_409_until_one_is_deleted(server: Server, client: httpx.Client,
                                                 http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    ids = [create(client, f"{base}/clip.mp4", on_end="reconnect")["id"] for _ in range(4)]
    response = client.post("/v1/sources", json={"url": f"{base}/clip.mp4"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "too_many_sources"
    assert client.delete(f"/v1/sources/{ids[0]}").status_code == 200
    create(client, f"{base}/clip.mp4")
    listing = client.get("/v1/sources").json()
    assert len(listing["sources"]) == 4 and listing["max"] == 4
    assert listing["allowed"]["hosts"] == ["127.0.0.0/8"]


def test_stale_frames_are_dropped_while_the_model_is_busy(server: Server, client: httpx.Client,
                                                          synthetic_video: SyntheticVideo) -> None:
    write_mp4(server.root / "files" / "busy.mp4", clip_frames(synthetic_video.frames, 30))
    dropped_before = metric(client, 'vss_frames_dropped_total{reason="source_stale"}')
    lock = server.app.state.data_plane.engine_lock  # what every network call of the app waits for
    lock.acquire()  # the model is busy (a long upload, say): the source's worker cannot segment
    try:
        source = create(client, "file:busy.mp4", realtime=False)
        wait_until(lambda: state_of(client, source["id"])["frames"] == 30, 60, "the reader to decode every frame")
    finally:
        lock.release()
    done = wait_state(client, source["id"], {"stopped"})
    queue = server.app.state.settings.sources_queue_size
    # the frame in the network when the lock was taken, and the `queue` freshest ones; the rest dropped
    assert done["frames_segmented"] <= queue + 1 and done["dropped"] == 30 - done["frames_segmented"], done
    assert metric(client, 'vss_frames_dropped_total{reason="source_stale"}') == dropped_before + done["dropped"]


def test_subscriber_of_an_ended_source_gets_its_state_and_a_normal_close(server: Server, client: httpx.Client,
                                                                          synthetic_video: SyntheticVideo) -> None:
    write_mp4(server.root / "files" / "ended.mp4", list(synthetic_video.frames))
    source = create(client, "file:ended.mp4", realtime=False)
    wait_state(client, source["id"], {"stopped"})
    with subscribe(server, source["id"]) as (ws, ready):
        meta, _ = next_message(ws)
        assert meta == {"type": "state", "source": source["id"], "state": "stopped", "error": "end of stream"}
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == 1000


def test_api_key_protects_every_sources_route(tmp_path: Path, tiny_checkpoint: Path,
                                              http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    with vss_server(tmp_path, tiny_checkpoint, api_key="s3cret") as live, live.client() as anonymous:
        assert anonymous.post("/v1/sources", json={"url": f"{base}/clip.mp4"}).status_code == 401
        assert anonymous.get("/v1/sources").status_code == 401
        wrong = anonymous.get("/v1/sources", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        with live.client(Authorization="Bearer s3cret") as authorised:
            source = create(authorised, f"{base}/clip.mp4")
            with connect(f"{live.ws}/v1/sources/{source['id']}/results") as ws:
                error = json.loads(ws.recv(timeout=30))
                assert error["type"] == "error" and error["error"]["code"] == "unauthorized"
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=30)
                assert ws.close_code == 1008
            with subscribe(live, source["id"], headers={"Authorization": "Bearer s3cret"}) as (ws, _):
                assert frames_from(ws, 1)
            assert anonymous.delete(f"/v1/sources/{source['id']}").status_code == 401
            assert authorised.delete(f"/v1/sources/{source['id']}").status_code == 200


def test_collect_feeds_the_clip_buffer_through_the_stream_hook(tmp_path: Path, tiny_checkpoint: Path,
                                                               synthetic_video: SyntheticVideo) -> None:
    with vss_server(tmp_path, tiny_checkpoint, buffer_enabled=True, buffer_clip_frames=2,
                    buffer_clip_every=2) as live, live.client() as c:
        write_mp4(live.root / "files" / "c.mp4", clip_frames(synthetic_video.frames, 12))
        source = create(c, "file:c.mp4", collect=True)
        done = wait_state(c, source["id"], {"stopped"})
        assert done["frames_segmented"] >= 2, done
        wait_until(lambda: c.get("/v1/clips").json()["sources"].get("source", 0) >= 1, 30,
                   "a clip from the source in the buffer")
        other = create(c, "file:c.mp4")  # collect is off by default
        wait_state(c, other["id"], {"stopped"})
        assert c.get("/v1/clips").json()["sources"]["source"] <= done["frames_segmented"] // 2


def test_frames_over_the_pixel_limit_fail_the_source(tmp_path: Path, tiny_checkpoint: Path,
                                                     synthetic_video: SyntheticVideo) -> None:
    with vss_server(tmp_path, tiny_checkpoint, max_width=64, max_height=64) as live, live.client() as c:
        write_mp4(live.root / "files" / "big.mp4", list(synthetic_video.frames))  # 128x64 > 64x64 pixels
        source = create(c, "file:big.mp4")
        failed = wait_state(c, source["id"], {"failed"})
        assert "128x64 frames are over the limit of 64x64 pixels" in failed["error"], failed
        assert failed["frames_segmented"] == 0


def test_stopping_the_server_stops_its_sources(tmp_path: Path, tiny_checkpoint: Path,
                                               http_media: tuple[str, list[str]]) -> None:
    base, _ = http_media
    with vss_server(tmp_path, tiny_checkpoint) as live, live.client() as c:
        source = create(c, f"{base}/clip.mp4", on_end="reconnect")
        wait_state(c, source["id"], {"running"})
        assert source_threads(source["id"])
    assert source_threads(source["id"]) == []
