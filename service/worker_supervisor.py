"""The spawned adaptation worker (``VSS_WORKER=spawn``): one child process per server, kept alive.

``WorkerSupervisor`` starts ``service.worker`` as a child process (with the server's worker
settings on its command line), fails the job a dead worker held at once, restarts the worker with
an exponential backoff, and reaps jobs of silent workers. The child follows its parent: it exits
when the server process is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .adapt_jobs import AdaptJobStore

log = logging.getLogger(__name__)


def worker_command(settings_json: str, parent_pid: int) -> list[str]:
    """argv of a worker child process (imports ``service.worker`` directly: no CLI, no torch until a job)."""
    return [sys.executable, "-c", "import sys; from service.worker import main; sys.exit(main(sys.argv[1:]))",
            "--settings-json", settings_json, "--parent-pid", str(parent_pid)]


class WorkerSupervisor:
    """Keeps one worker child process alive for a server (``VSS_WORKER=spawn``) and reaps dead jobs."""

    def __init__(self, argv: list[str], jobs: AdaptJobStore, heartbeat_timeout_s: float,
                 check_interval_s: float = 0.5, restart_backoff_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        self.argv, self.jobs = argv, jobs
        self.heartbeat_timeout_s, self.check_interval_s = heartbeat_timeout_s, check_interval_s
        self.restart_backoff_s, self.max_backoff_s = restart_backoff_s, max_backoff_s
        self.host = socket.gethostname()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._backoff = restart_backoff_s  # doubles while the worker keeps dying young
        self._spawned_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards ``proc``
        self._start_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Spawn the worker and start supervising it (idempotent)."""
        with self._start_lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._spawn()
            self._thread = threading.Thread(target=self._monitor, name="vss-worker-supervisor", daemon=True)
            self._thread.start()

    def _spawn(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # so the child imports this very package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with self._lock:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, close_fds=True)
        self._spawned_at = time.monotonic()
        log.info("started adaptation worker pid %d", self.proc.pid)

    def _monitor(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check()
            except Exception:  # the supervisor must outlive any one bad check
                log.exception("adaptation worker supervision failed")

    def check(self) -> None:
        """One supervision round: fail the jobs of a dead worker and restart it; reap silent workers."""
        proc = self.proc
        if proc is not None and proc.poll() is not None and not self._stop.is_set():
            code = proc.returncode
            failed = self.jobs.fail_claimed(proc.pid, self.host, "worker_lost",
                                            f"the adaptation worker died with exit status {code}")  # pid: logged below
            self.jobs.forget_worker(proc.pid, self.host)
            if time.monotonic() - self._spawned_at > self.max_backoff_s:
                self._backoff = self.restart_backoff_s  # it had been running fine: restart promptly
            log.error("adaptation worker pid %d exited with status %s%s; restarting it in %.0f s", proc.pid, code,
                      f" (failed job {', '.join(failed)})" if failed else "", self._backoff)
            if self._stop.wait(self._backoff):
                return
            self._backoff = min(2 * self._backoff, self.max_backoff_s)
            self.restarts += 1
            self._spawn()
        self.jobs.reap(self.heartbeat_timeout_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop supervising, ask the worker to exit (SIGTERM), kill it if it does not."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self.jobs.fail_claimed(proc.pid, self.host, "worker_stopped", "the server stopped its adaptation worker")
        self.jobs.forget_worker(proc.pid, self.host)
