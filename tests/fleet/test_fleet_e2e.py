"""The fleet end to end: SeaweedFS, three `vss serve` replicas with separate caches and no shared
directory, and one `vss worker`, all on the S3 store.

Streams and uploads go through all three replicas; their clips reach the worker through the shared
buffer; `POST /v1/adapt` on one replica is run by the worker, which publishes; every replica serves
the new version within 10 s; a replica killed with SIGKILL mid-stream leaves the others answering.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from service.storage import S3Store
from service.store_buffer import StoreClipBuffer
from service.store_registry import StoreRegistry
from tests.fleet.cluster import Process, Replica, demo_checkpoint, worker_process
from tests.s3server import SeaweedServer
from tests.waiting import wait_until

API_KEY = "fleet-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SIZE = (128, 256)
FINAL = ("published", "rejected", "failed", "cancelled")

pytestmark = pytest.mark.slow


def fog_frames(seed: int, n: int = 8) -> np.ndarray:
    from adaptation.synth import generate_clip

    return generate_clip("fog", frames=n, size=SIZE, seed=seed).frames


def test_three_replicas_and_a_worker_behave_as_one_service(s3_server: SeaweedServer, tmp_path: Path,
                                                           synthetic_video) -> None:
    root = f"s3://vss-test/e2e-{uuid.uuid4().hex[:8]}"
    env = s3_server.env()
    publisher = StoreRegistry(S3Store(f"{root}/models", env), tmp_path / "publisher-cache")
    publisher.import_dir(demo_checkpoint(tmp_path / "demo", SIZE), activate=True)
    extra = {"VSS_API_KEY": API_KEY, "VSS_BUFFER_CLIP_FRAMES": "8", "VSS_BUFFER_CLIP_EVERY": "8",
             "VSS_ADAPT_MIN_CLIPS": "2"}
    replicas = [Replica(name, env, root, tmp_path, **extra) for name in ("a", "b", "c")]
    processes: list[Process] = [*replicas, worker_process(env, root, tmp_path, **extra)]
    streams = []
    try:
        for r in replicas:
            wait_until(lambda r=r: r.serving() == "v0001" or not r.alive(), 600, f"replica {r.name} to serve")
            assert r.alive(), r.tail()

        # Traffic through every replica: an upload each, and a stream of two 8-frame scenes each.
        for r in replicas:
            up = r.http.post("/v1/segment?format=json&collect=false",
                             files={"video": ("clip.mp4", synthetic_video.path.read_bytes(), "video/mp4")})
            assert up.status_code == 200 and up.headers["x-model-version"] == "v0001", up.text
        for i, r in enumerate(replicas):
            stream = r.stream()
            assert stream.hello["model_version"] == "v0001"
            for scene in (2 * i + 1, 2 * i + 2):
                for frame in fog_frames(scene):
                    stream.step(frame)
            streams.append(stream)
        shared = StoreClipBuffer(S3Store(f"{root}/buffer", env))
        wait_until(lambda: len(shared.clips()) == 6, 60, "the six clips of the three replicas in the shared buffer")
        assert replicas[2].http.get("/v1/clips").json()["clips"] == 6

        # A job posted on one replica, run by the worker, seen from another.
        r = replicas[0].http.post("/v1/adapt", json={"method": "bn", "steps": 10}, headers=AUTH)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = wait_until(lambda: (j := replicas[1].http.get(f"/v1/adapt/{job_id}").json())["state"] in FINAL and j,
                         300, "the adaptation job to finish")
        assert job["state"] == "published", json.dumps(job, indent=1)
        # the replicas run no worker (VSS_WORKER=external): the worker process ran it (answers name no pid)
        assert job["version"] == "v0002" and job["activated"] and "worker" not in job
        published = time.monotonic()
        wait_until(lambda: all(r.serving() == "v0002" for r in replicas), 10,
                   "every replica to serve v0002 within 10 s of the publish")
        print(f"\nlast replica serving v0002 {time.monotonic() - published:.2f} s after the test saw the publish")

        # Streams keep going on the new version (from a keyframe), with no frame lost.
        for stream in streams:
            meta = stream.step(fog_frames(20)[0])
            assert meta["model_version"] == "v0002" and meta["keyframe"] is True
            assert [m["frame"] for m in stream.replies] == list(range(stream.sent))

        # SIGKILL one replica mid-stream: the others keep answering.
        doomed = streams[2]
        doomed.step(fog_frames(21)[0])
        replicas[2].kill()
        for stream in streams[:2]:
            for frame in fog_frames(22, 3):
                assert stream.step(frame)["model_version"] == "v0002"
        for r in replicas[:2]:
            assert r.serving() == "v0002"
            up = r.http.post("/v1/segment?format=json&collect=false",
                             files={"video": ("clip.mp4", synthetic_video.path.read_bytes(), "video/mp4")})
            assert up.status_code == 200 and up.headers["x-model-version"] == "v0002"
    finally:
        for stream in streams:
            stream.close()
        for p in processes:
            p.stop()
        for p in processes:
            print(f"--- {p.log.name}\n{p.tail(1500)}")
