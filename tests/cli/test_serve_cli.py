"""`vss serve` / `make run`: a busy port is one clear line, logs are text on a terminal and JSON otherwise
(VSS_LOG_FORMAT), successful polls are logged at debug level, `make run PORT= HOST=`."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.metrics import request_log_level
from service.registry import ModelRegistry
from service.settings import Settings
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSS_")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VSS_MODEL_DIR": str(tmp_path / "models"),
            "VSS_BUFFER_DIR": str(tmp_path / "buffer"), "VSS_JOB_DIR": str(tmp_path / "jobs"),
            "VSS_CACHE_DIR": str(tmp_path / "cache"), "VSS_WORKER": "off", "VSS_FLOW": "none", **extra}


def test_busy_port_is_one_line_and_nothing_is_served(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=serve_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"vss: error: port {port} on 127.0.0.1 is already in use (another vss serve?): stop it, or pick another "
        "port with --port N (make run PORT=N)"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_takes_port_and_host() -> None:
    def dry_run(*args: str) -> str:
        # under `make test` the parent make passes -w (directory lines) through MAKEFLAGS
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        done = subprocess.run(["make", "--no-print-directory", "-n", "run", *args], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert dry_run("PORT=8123", "HOST=0.0.0.0").endswith("vss serve --host 0.0.0.0 --port 8123")
    assert dry_run("PORT=9000").endswith("vss serve  --port 9000")
    assert dry_run().endswith("vss serve")  # $VSS_PORT / $VSS_HOST / 8000 on 127.0.0.1


@contextmanager
def server(tmp_path: Path, tiny_checkpoint: Path, terminal: bool, **env: str) -> Iterator[tuple[str, list[str]]]:
    """`vss serve --port 0` with stderr on a pseudo-terminal or a pipe; yields (url, stderr chunks so far)."""
    ModelRegistry(tmp_path / "models").import_dir(tiny_checkpoint, activate=True)
    chunks: list[str] = []
    master = slave = None
    if terminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "0"], cwd=tmp_path,
                            env=serve_env(tmp_path, **env), stdout=subprocess.PIPE, text=True,
                            stderr=slave if terminal else subprocess.PIPE)

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536).decode(errors="replace") if master is not None else \
                    proc.stderr.readline()  # type: ignore[union-attr]
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    threading.Thread(target=drain, daemon=True).start()
    try:
        if slave is not None:
            os.close(slave)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.match(r"vss: serving on (http://127\.0\.0\.1:\d+) ", line)
        assert match, (line, "".join(chunks))
        url = match.group(1)
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 120, "the model to load")
        yield url, chunks
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if master is not None:
            os.close(master)


def make_requests(url: str, chunks: list[str]) -> str:
    for path in ("/healthz", "/v1/models", "/v1/models/active", "/v1/clips", "/v1/adapt", "/v1/jobs/nope"):
        httpx.get(url + path, timeout=30)
    httpx.get(url + "/v1/the-end", timeout=30)  # a 404: logged at info level, and the last request
    return wait_until(lambda: "".join(chunks) if "/v1/the-end" in "".join(chunks) else None, 60, "the log line")


def test_text_logs_on_a_terminal_and_polls_at_debug(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with server(tmp_path, tiny_checkpoint, terminal=True) as (url, chunks):
        text = make_requests(url, chunks)
    lines = [line for line in text.replace("\r", "").splitlines() if "vss.http" in line]
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO  vss\.http: GET /v1/the-end 404 \(\d+ ms\)", lines[-1]), lines
    assert [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in lines] == ["GET /v1/jobs/nope 404",
                                                                             "GET /v1/the-end 404"]
    assert "{" not in "".join(lines)


def test_json_logs_when_not_a_terminal(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with server(tmp_path, tiny_checkpoint, terminal=False) as (url, chunks):
        text = make_requests(url, chunks)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    http = [r["msg"] for r in records if r["logger"] == "vss.http"]
    assert http == ["GET /v1/jobs/nope 404", "GET /v1/the-end 404"]
    assert all(r["level"] in ("info", "warning", "error") for r in records)


def test_log_format_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).json_logs(terminal=True) is False
    assert Settings(_env_file=None).json_logs(terminal=False) is True
    assert Settings(_env_file=None, log_format="json").json_logs(terminal=True) is True
    assert Settings(_env_file=None, log_format="text").json_logs(terminal=False) is False
    assert Settings(_env_file=None, log_format="text", log_json=True).json_logs(terminal=True) is True
    with pytest.raises(ValueError):
        Settings(_env_file=None, log_format="xml")
    monkeypatch.setenv("VSS_LOG_FORMAT", "json")
    assert Settings(_env_file=None).json_logs(terminal=True) is True


def test_request_log_levels() -> None:
    assert request_log_level("GET", "/v1/jobs/{job_id}", 200, True) == logging.DEBUG
    assert request_log_level("GET", "/v1/jobs/{job_id}", 404, True) == logging.INFO
    assert request_log_level("POST", "/v1/adapt", 202, True) == logging.INFO
    assert request_log_level("GET", "/readyz", 503, True) == logging.DEBUG
    assert request_log_level("POST", "/v1/segment", 500, True) == logging.ERROR
    assert request_log_level("POST", "/v1/segment", 503, True) == logging.WARNING
    assert request_log_level("WS", "/v1/stream", 1011, False) == logging.INFO
