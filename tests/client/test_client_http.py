"""vss_client against a real server: segment (answered at once, and as a job with progress), errors that
carry the server's JSON error, models, clips and adaptation, and the async client."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.client.servers import API_KEY, Server, write_clip
from vss_client import APIError, AsyncClient, Client, JobFailed, ServerUnreachable


def test_short_video_is_answered_at_once(server: Server, synthetic_video) -> None:
    reports: list[tuple[int, int]] = []
    with Client(server.url) as vss:
        result = vss.segment(synthetic_video.path, format="zip", max_frames=3,
                             progress=lambda done, total: reports.append((done, total)))
    assert result.job is None and result.frames == 3 and result.model_version == "v0001"
    assert result.filename == "clip-segmentation.zip"
    maps = list(result.label_maps())
    assert len(maps) == 3 and maps[0].shape == (64, 128) and maps[0].dtype == np.uint8
    manifest = result.manifest()
    assert manifest["frames"] == 3 and len(manifest["palette"]) == len(manifest["classes"]) == 7
    assert int(max(m.max() for m in maps)) < 7
    assert reports == [(3, 3)]


def test_long_video_runs_as_a_job_with_progress(server: Server, synthetic_video, tmp_path: Path) -> None:
    reports: list[tuple[int, int]] = []
    out = tmp_path / "sub" / "result.json"
    with Client(server.url) as vss:
        result = vss.segment(synthetic_video.path.read_bytes(), filename="drive.mp4", format="json", output=out,
                             poll_interval=0.05, progress=lambda done, total: reports.append((done, total)))
    assert result.job is not None and result.job["state"] == "done" and result.job["frames_total"] == 6
    assert result.path == out and result.content is None and result.frames == 6
    doc = result.json()
    assert len(doc["frames"]) == 6 and doc["summary"]["frames"] == 6
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temporary file left
    assert reports[-1] == (6, 6) and all(total == 6 for _, total in reports)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)


def test_errors_carry_the_servers_json_error(server: Server, synthetic_video) -> None:
    with Client(server.url) as vss:
        with pytest.raises(APIError) as bad_media:
            vss.segment(b"this is not a video", filename="x.mp4")
        with pytest.raises(APIError) as bad_size:
            vss.segment(synthetic_video.path, size="7x9")
        with pytest.raises(APIError) as no_key:
            vss.models.activate("v0001")
        with pytest.raises(APIError) as no_job:
            vss.job("nope")
    e = bad_media.value
    assert (e.status, e.code) == (415, "unsupported_media_type") and e.request_id and len(e.request_id) >= 16
    assert "x.mp4" in e.message and e.request_id in str(e)
    assert (bad_size.value.status, bad_size.value.code) == (422, "invalid_request")
    assert "multiples of 8" in bad_size.value.message
    assert (no_key.value.status, no_key.value.code) == (401, "unauthorized")
    assert (no_job.value.status, no_job.value.code) == (404, "job_not_found")


def test_unreachable_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with Client(f"http://127.0.0.1:{port}") as vss, pytest.raises(ServerUnreachable, match="cannot reach"):
            vss.models.list()
    with pytest.raises(ValueError, match="http:// or https://"):
        Client("ftp://example")


def test_models_list_active_activate(server: Server, tiny_checkpoint: Path) -> None:
    from service.registry import ModelRegistry

    registry = ModelRegistry(server.settings.model_dir)
    second = registry.import_dir(tiny_checkpoint)
    with Client(server.url, api_key=API_KEY) as vss:
        versions = vss.models.list()
        assert [v["version"] for v in versions][:2] == ["v0001", second]
        assert versions[0]["active"] and versions[0]["serving"] and versions[0]["classes"][0] == "road"
        assert vss.models.active()["version"] == "v0001"
        assert vss.models.activate(second)["version"] == second
        assert vss.models.listing()["active"] == second
        with pytest.raises(APIError) as missing:
            vss.models.activate("v0099")
        assert (missing.value.status, missing.value.code) == (404, "version_not_found")
        assert vss.models.activate("v0001")["version"] == "v0001"  # roll back


def test_clips_and_adaptation_job(server: Server, tmp_path: Path) -> None:
    reports: list[tuple[int, int]] = []
    with Client(server.url, api_key=API_KEY) as vss:
        for seed in range(20):  # held-out clips are picked by a hash of the frames: add until both kinds exist
            stats = vss.clips()
            if stats["train_clips"] >= 2 and stats["heldout_clips"] >= 1:
                break
            video = write_clip(tmp_path / f"v{seed}.mp4", seed)
            added = vss.add_clips(video if seed % 2 else video.read_bytes(), clip_frames=3)
            assert added["frames"] == 6 and len(added["added"]) == 2
        job = vss.adapt("bn", steps=2, poll_interval=0.1, timeout=600,
                        progress=lambda done, total: reports.append((done, total)))
        assert job["state"] in ("published", "rejected"), job
        assert reports and reports[-1][1] == 2
        assert vss.adapt_job(job["id"])["state"] == job["state"]
        assert vss.adapt_jobs()[0]["id"] == job["id"]
        with pytest.raises(APIError) as bad:
            vss.adapt("no-such-method")
        assert (bad.value.status, bad.value.code) == (422, "unknown_method")
        if job["state"] == "published":
            vss.models.activate("v0001")


def test_job_failed_carries_the_error() -> None:
    failed = JobFailed({"id": "j1", "state": "failed", "error": {"code": "unsupported_media_type", "message": "bad"}})
    assert failed.code == "unsupported_media_type" and "j1 failed" in str(failed)


def test_async_client(server: Server, synthetic_video) -> None:
    frames = synthetic_video.frames[:3]

    async def main() -> tuple[list[int], int, list[str], dict]:
        async with AsyncClient(server.url) as vss:
            reports: list[int] = []
            result = await vss.segment(synthetic_video.path, format="json", poll_interval=0.05,
                                       progress=lambda done, total: reports.append(done))
            indices = [r.index async for r in vss.stream(iter(frames), format="png")]
            versions = [v["version"] for v in await vss.models.list()]
            return indices, len(result.json()["frames"]), versions, {"last": reports[-1]}

    indices, n, versions, reports = asyncio.run(main())
    assert indices == [0, 1, 2] and n == 6 and versions[0] == "v0001" and reports["last"] == 6
    assert json.dumps(reports)
