"""A full disk answers 507, a read-only store 503, and nothing partial remains (issue 10, defect 7):
a real server on loopback with its directories on a tiny tmpfs that is full, or remounted read-only.

The mounts need root (CI runs the tests as root); without it, or where mounting fails, the tests skip.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings
from service.video_io import VideoWriter
from tests.service.live import live_server
from tests.waiting import wait_until

FILLER = "filler.bin"


@pytest.fixture()
def mounts(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``mount(name, size)``: a fresh tmpfs at ``tmp_path/name``; all are unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    made: list[Path] = []

    def mount(name: str, size: str = "1m") -> Path:
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        made.append(target)
        return target

    yield mount
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount_read_only(target: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)


def fill(target: Path, leave: int = 0) -> None:
    """Fill the filesystem of ``target``, then free about ``leave`` bytes again."""
    chunk = b"\0" * 65536
    with open(target / FILLER, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = (target / FILLER).stat().st_size
    os.truncate(target / FILLER, max(size - leave, 0))


def files(target: Path) -> list[str]:
    """Every regular file under ``target`` but the filler and lock files (what a request may have left)."""
    return sorted(str(p.relative_to(target)) for p in target.rglob("*")
                  if p.is_file() and p.name not in (FILLER, ".lock"))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 12-frame 64x128 MP4 of incompressible frames (~100 KB)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("disk") / "v.mp4"
    with VideoWriter(path, 10.0, 128, 64, crf=23) as writer:
        for _ in range(12):
            writer.write(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))
    return path.read_bytes()


def settings_for(root: Path, **overrides: Any) -> Settings:
    base = {"model_dir": root / "models", "buffer_dir": root / "buffer", "cache_dir": root / "cache",
            "job_dir": root / "jobs", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
            "device": "cpu", "flow": "none", "worker": "off", "warmup": False}
    return Settings(_env_file=None, **{**base, **overrides})


def serve(root: Path, tiny_checkpoint: Path, **overrides: Any):
    if not (root / "models").exists():
        ModelRegistry(root / "models").import_dir(tiny_checkpoint, activate=True)
    return live_server(create_app(settings_for(root, **overrides)))


def expect(r: httpx.Response, status: int, code: str, what: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and what in error["message"], error
    assert "/" not in error["message"], "a path leaked into the answer"


def segment(url: str, data: bytes, query: str = "format=zip") -> httpx.Response:
    return httpx.post(f"{url}/v1/segment?{query}", files={"video": ("v.mp4", data)}, timeout=120)


def test_full_disk_while_receiving_an_upload(mounts, tmp_path: Path, tiny_checkpoint: Path, video: bytes) -> None:
    jobs = mounts("jobs")
    with serve(tmp_path, tiny_checkpoint, job_dir=jobs) as url:
        fill(jobs, leave=16 * 1024)
        expect(segment(url, video), 507, "insufficient_storage", "storing the upload")
        assert files(jobs) == []
        (jobs / FILLER).unlink()
        assert segment(url, video).status_code == 200  # space is back: so is the service


def test_full_disk_while_writing_a_result(mounts, tmp_path: Path, tiny_checkpoint: Path, video: bytes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    jobs, marker, release = mounts("jobs"), tmp_path / "reached", tmp_path / "release"
    monkeypatch.setenv("VSS_CRASHPOINT", "segment_frame")  # the server runs in this process (a thread)
    monkeypatch.setenv("VSS_CRASHPOINT_FILE", str(marker))
    monkeypatch.setenv("VSS_CRASHPOINT_RELEASE", str(release))
    with serve(tmp_path, tiny_checkpoint, job_dir=jobs) as url:
        answer: list[httpx.Response] = []
        client = threading.Thread(target=lambda: answer.append(segment(url, video)))
        client.start()
        wait_until(marker.exists, 60, "the first segmented frame")
        fill(jobs)  # the upload is stored; now the result cannot be
        release.touch()
        client.join(120)
        expect(answer[0], 507, "insufficient_storage", "writing the result")
        assert files(jobs) == []  # no upload, no .part of the zip


def test_full_disk_fails_a_job_with_the_reason(mounts, tmp_path: Path, tiny_checkpoint: Path, video: bytes,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    jobs, marker, release = mounts("jobs"), tmp_path / "reached", tmp_path / "release"
    monkeypatch.setenv("VSS_CRASHPOINT", "upload_job_start")
    monkeypatch.setenv("VSS_CRASHPOINT_FILE", str(marker))
    monkeypatch.setenv("VSS_CRASHPOINT_RELEASE", str(release))
    with serve(tmp_path, tiny_checkpoint, job_dir=jobs, job_frame_threshold=1) as url:
        r = segment(url, video)
        assert r.status_code == 202, r.text
        wait_until(marker.exists, 60, "the job to start")
        fill(jobs, leave=4096)  # room for the job's record, not for its result
        release.touch()
        job = wait_until(lambda: (j := httpx.get(f"{url}{r.headers['location']}").json())["state"] == "failed" and j,
                         120, "the job to fail")
        assert job["error"]["code"] == "insufficient_storage" and "/" not in job["error"]["message"]
        assert files(jobs) == [f"records/{job['id']}.json"]  # the record says why; upload and result are gone


def test_full_disk_while_storing_clips_keeps_none(mounts, tmp_path: Path, tiny_checkpoint: Path) -> None:
    buffer = mounts("buffer")
    rng = np.random.default_rng(1)
    images = [("images", (f"{i}.png", cv2.imencode(".png", rng.integers(0, 255, (64, 128, 3), np.uint8))[1].tobytes(),
                          "image/png")) for i in range(6)]
    with serve(tmp_path, tiny_checkpoint, buffer_dir=buffer) as url:
        fill(buffer, leave=80 * 1024)  # room for the first clip (~50 KB), not for all three
        r = httpx.post(f"{url}/v1/clips?clip_frames=2", files=images, timeout=60)
        expect(r, 507, "insufficient_storage", "storing the clips")
        assert files(buffer) == []
        assert httpx.get(f"{url}/v1/clips").json()["clips"] == 0


def test_full_disk_while_creating_an_adapt_job(mounts, tmp_path: Path, tiny_checkpoint: Path) -> None:
    from adaptation.synth import generate_clip
    from service.buffer import ClipBuffer

    adapt_jobs = mounts("adapt")
    buffer = ClipBuffer(tmp_path / "buffer", heldout_fraction=0.01)
    for seed in range(3):
        buffer.add(generate_clip("fog", frames=2, size=(64, 128), seed=seed).frames)
    with serve(tmp_path, tiny_checkpoint, adapt_job_dir=adapt_jobs, adapt_min_clips=1) as url:
        fill(adapt_jobs)
        r = httpx.post(f"{url}/v1/adapt", json={"method": "bn", "steps": 1}, timeout=60)
        expect(r, 507, "insufficient_storage", "creating the adaptation job")
        assert files(adapt_jobs) == [] and httpx.get(f"{url}/v1/adapt").json()["jobs"] == []


def test_read_only_registry_refuses_activation(mounts, tmp_path: Path, tiny_checkpoint: Path) -> None:
    models = mounts("ro-models", "8m")
    registry = ModelRegistry(models)
    registry.import_dir(tiny_checkpoint, activate=True)
    registry.import_dir(tiny_checkpoint)
    remount_read_only(models)
    with serve(tmp_path, tiny_checkpoint, model_dir=models) as url:
        r = httpx.post(f"{url}/v1/models/v0002/activate", timeout=60)
        expect(r, 503, "storage_read_only", "activating v0002")
        assert httpx.get(f"{url}/v1/models/active").json()["version"] == "v0001"
        assert registry.active() == "v0001"


def test_read_only_job_and_buffer_directories(mounts, tmp_path: Path, tiny_checkpoint: Path, video: bytes) -> None:
    store = mounts("ro-store")
    for name in ("jobs", "buffer", "adapt"):
        (store / name).mkdir()
    remount_read_only(store)
    with serve(tmp_path, tiny_checkpoint, job_dir=store / "jobs", buffer_dir=store / "buffer",
               adapt_job_dir=store / "adapt", adapt_min_clips=1) as url:
        expect(segment(url, video), 503, "storage_read_only", "storing the upload")
        r = httpx.post(f"{url}/v1/clips", files={"video": ("v.mp4", video)}, timeout=60)
        expect(r, 503, "storage_read_only", "storing the clips")
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_zip_sink_abort_on_a_full_disk_never_raises(mounts) -> None:
    from service.outputs import ZipSink
    from service.stream_segmenter import FrameResult

    out = mounts("out")
    sink = ZipSink(out / "r.zip", ["a", "b"], np.array([[0, 0, 0], [255, 255, 255]], np.uint8))
    rng = np.random.default_rng(0)
    result = FrameResult(index=0, labels=rng.integers(0, 2, (256, 256), dtype=np.uint8), class_fractions={},
                         latency_ms=1.0, model_version="v0001", keyframe=True)
    fill(out)
    with pytest.raises(OSError) as failed:
        for _ in range(8):
            sink.add(result.labels, result)
        sink.finish({"stride": 1})
    assert failed.value.errno == errno.ENOSPC
    sink.abort()  # closing the zip writes its directory: on a full disk that fails again, quietly
    assert files(out) == []
