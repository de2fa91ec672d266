"""Clip buffer and adaptation jobs on a shared store, on both backends (a directory and SeaweedFS S3)."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from service.adapt_jobs import FAILED, QUEUED, RUNNING, JobConflict
from service.buffer import ClipDamaged, ClipNotFound
from service.storage import ObjectStore
from service.store_buffer import StoreClipBuffer
from service.store_jobs import LOCK_KEY, StoreJobStore, StoreLease


def frames(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 16, 24, 3), dtype=np.uint8)


def run_all(targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_clips_from_every_replica_reach_the_worker(store: ObjectStore) -> None:
    replicas = [StoreClipBuffer(store, max_clips=100) for _ in range(3)]
    added = [replicas[i % 3].add(frames(i), source=f"replica-{i % 3}") for i in range(6)]
    worker = StoreClipBuffer(store, max_clips=100)
    assert [c.id for c in worker.clips()] == sorted(c.id for c in added)
    assert worker.stats()["sources"] == {"replica-0": 2, "replica-1": 2, "replica-2": 2}
    np.testing.assert_array_equal(worker.load(added[4].id), frames(4))
    assert worker.remove(added[0].id) and not worker.remove(added[0].id)
    with pytest.raises(ClipNotFound):
        replicas[1].load(added[0].id)
    store.put(f"{added[1].id}.npz", b"not a zip")
    with pytest.raises(ClipDamaged):
        worker.load(added[1].id)


def test_bounds_hold_across_the_fleet(store: ObjectStore) -> None:
    size = StoreClipBuffer(store).add(frames(100)).bytes  # every clip of this shape compresses alike
    StoreClipBuffer(store).clear()
    replicas = [StoreClipBuffer(store, max_clips=5, max_bytes=100 * size) for _ in range(3)]
    run_all([lambda r=r, k=k: [r.add(frames(10 * k + i)) for i in range(4)] for k, r in enumerate(replicas)])
    left = StoreClipBuffer(store).clips()
    assert len(left) <= 5
    by_bytes = StoreClipBuffer(store, max_clips=100, max_bytes=int(2.5 * size))
    by_bytes.add(frames(999))
    assert len(by_bytes.clips()) <= 3 and by_bytes.stats()["bytes"] <= 2.5 * size


def test_one_active_job_across_replicas_and_one_claimer(store: ObjectStore) -> None:
    a, b = StoreJobStore(store), StoreJobStore(store)
    job = a.create({"method": "tent", "steps": 3})
    with pytest.raises(JobConflict):
        b.create({"method": "tent", "steps": 3})
    workers = [StoreJobStore(store) for _ in range(6)]
    claimed = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        got = workers[i].claim({"pid": 1000 + i, "host": f"host-{i}"})
        if got is not None:
            claimed.append((i, got["id"]))

    run_all([lambda i=i: claim(i) for i in range(6)])
    assert len(claimed) == 1 and claimed[0][1] == job["id"]
    record = b.get(job["id"])
    assert record["state"] == RUNNING and record["worker"]["pid"] == 1000 + claimed[0][0]
    assert not store.exists(LOCK_KEY)  # every lease was released


def test_a_dead_workers_job_is_failed_with_a_reason(store: ObjectStore) -> None:
    server, worker = StoreJobStore(store), StoreJobStore(store)
    job = server.create({"method": "tent", "steps": 3})
    assert server.get(job["id"])["state"] == QUEUED
    worker.claim({"pid": 4242, "host": "another-machine"})
    assert server.reap(timeout_s=30.0) == []  # its heartbeat is fresh
    failed = server.reap(timeout_s=30.0, now=time.time() + 31.0)  # the worker went silent
    assert failed == [job["id"]]
    record = server.get(job["id"])
    assert record["state"] == FAILED and record["error"]["code"] == "worker_lost"
    assert "heartbeat" in record["error"]["message"]  # and no host name or pid: answers carry no internals
    assert "another-machine" not in record["error"]["message"] and "4242" not in record["error"]["message"]
    assert worker.cancel_requested(job["id"])  # a worker that lost its lease stops before publishing
    server.create({"method": "tent", "steps": 3})  # the fleet can run the next job


def test_worker_heartbeats_are_visible_fleet_wide(store: ObjectStore) -> None:
    StoreJobStore(store).beat({"pid": 7, "host": socket.gethostname(), "job": None})
    assert [w["pid"] for w in StoreJobStore(store).workers(10.0)] == [7]
    StoreJobStore(store).forget_worker(7, socket.gethostname())
    assert StoreJobStore(store).workers(10.0) == []


def test_the_lease_excludes_and_an_expired_one_is_taken_over(store: ObjectStore) -> None:
    inside, overlaps = [0], []

    def critical() -> None:
        with StoreLease(store).held():
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.01)
            inside[0] -= 1

    run_all([critical for _ in range(6)])
    assert overlaps == [1] * 6
    store.put(LOCK_KEY, json.dumps({"token": "dead", "at": time.time() - 120}).encode())  # its holder died
    lease = StoreLease(store, ttl_s=60.0, wait_s=5.0)
    token = lease.acquire()
    assert json.loads(store.get(LOCK_KEY).data)["token"] == token
    lease.release(token)
    assert not store.exists(LOCK_KEY)


def test_the_auto_policy_state_is_shared_through_the_store(store: ObjectStore) -> None:
    worker, server = StoreJobStore(store), StoreJobStore(store)
    assert server.read_auto_state() is None
    worker.write_auto_state({"enabled": True, "rounds": {"started": 2}})
    assert server.read_auto_state() == {"enabled": True, "rounds": {"started": 2}}
    assert server.list() == []  # not a job record
