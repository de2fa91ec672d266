"""A real uvicorn server on 127.0.0.1 in a thread, shared by the live-server tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from tests.waiting import wait_until


@contextmanager
def live_server(app: FastAPI, scheme: str | None = "http", timeout_s: float = 60.0,
                **config: object) -> Iterator[str]:
    """Serve ``app`` until the block ends; waits until a model is loaded.

    Yields ``<scheme>://127.0.0.1:PORT``, or ``127.0.0.1:PORT`` when ``scheme`` is None.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started and app.state.engine_manager.ready, timeout_s,
                   "the server to start with a model loaded", 0.02,
                   give_up=lambda: None if thread.is_alive() else "its thread ended")
        host = f"127.0.0.1:{sock.getsockname()[1]}"
        yield f"{scheme}://{host}" if scheme else host
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
