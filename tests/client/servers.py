"""Real servers for the client tests: ``create_app`` under uvicorn on a loopback port, short uploads
answered at once and longer ones (over 3 frames) run as jobs, a spawned adaptation worker."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from service.app import create_app
from service.drain import DrainingServer
from service.settings import Settings
from tests.waiting import wait_until

API_KEY = "client-key"


def settings_for(root: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model_dir": root / "models", "buffer_dir": root / "buffer", "cache_dir": root / "cache",
        "job_dir": root / "jobs", "demo_model": None, "registry_poll_ms": 50, "intra_op_threads": 1,
        "device": "cpu", "flow": "dis-ultrafast", "worker": "spawn", "adapt_threads": 1, "adapt_min_clips": 2,
        "buffer_heldout_fraction": 0.3, "job_frame_threshold": 3, "api_key": API_KEY}
    return Settings(_env_file=None, **{**base, **overrides})


@dataclass
class Server:
    url: str
    port: int
    settings: Settings
    app: Any


@contextmanager
def serve(settings: Settings, port: int = 0, wait_ready: bool = True, drain: bool = True) -> Iterator[Server]:
    """uvicorn in a thread on 127.0.0.1:``port`` (0: a free one; the address is reusable, so a test can
    restart a server on the same port), as `vss serve` runs it. Leaving the block stops it: with ``drain``
    as on SIGTERM (streams get a "draining" message, then close 1012), else uvicorn's bare shutdown (1012)."""
    sock = socket.create_server(("127.0.0.1", port))
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", ws_max_size=64 * 2**20, timeout_graceful_shutdown=10)
    server = DrainingServer(config, app.state.drain, 10.0) if drain else uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if wait_ready:
            wait_until(lambda: (server.started and app.state.engine_manager.ready) or not thread.is_alive(), 120,
                       "the server to start")
            assert thread.is_alive(), "the server did not start"
        port = sock.getsockname()[1]
        yield Server(f"http://127.0.0.1:{port}", port, settings, app)
    finally:
        if drain:
            server.handle_exit(signal.SIGTERM, None)
        else:
            server.should_exit = True
        thread.join(60)
        sock.close()


def write_clip(path: Path, seed: int, frames: int = 6) -> Path:
    """A short target-style (fog) MP4, different for every seed (the clip buffer drops duplicates)."""
    from adaptation.synth import generate_clip
    from service.video_io import VideoWriter

    clip = generate_clip("fog", frames=frames, size=(64, 128), seed=seed)
    with VideoWriter(path, 10.0, 128, 64, crf=18) as writer:
        for frame in clip.frames:
            writer.write(frame)
    return path
