"""HTTP checks of .ci/container-smoke against containers on 127.0.0.1 (standard library only).

    container_checks.py ready PORT TIMEOUT               /readyz answers 200 within TIMEOUT seconds
    container_checks.py segment PORT CLIP                POST /v1/segment with CLIP answers 200 and a zip
    container_checks.py provider PORT NAME               GET /v1/models/active names NAME as the provider
    container_checks.py follow PORT1 PORT2 VERSION KEY TIMEOUT
        both serve the same version; activating VERSION on PORT1 makes PORT2 serve it within TIMEOUT
Exit status 0 when the check holds, 1 (with one line on stderr) when it does not.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from email.message import Message
from pathlib import Path


def request(port: int, path: str, data: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 60.0) -> tuple[int, bytes, Message]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:  # not listening yet, connection reset while starting
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def serving(port: int) -> str | None:
    status, body, _ = request(port, "/v1/models/active", timeout=10)
    return json.loads(body)["version"] if status == 200 else None


def ready(port: int, timeout: float) -> None:
    wait_until(lambda: request(port, "/readyz", timeout=5)[0] == 200, timeout, f"/readyz on port {port}")


def segment(port: int, clip: Path) -> None:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"{clip.name}\"\r\n"
            "Content-Type: video/mp4\r\n\r\n").encode() + clip.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, answer, headers = request(port, "/v1/segment", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=300)
    if status != 200 or not answer.startswith(b"PK"):
        raise SystemExit(f"POST /v1/segment answered {status} {headers.get('Content-Type')}: {answer[:300]!r}")
    print(f"POST /v1/segment: 200, {len(answer)} bytes of {headers.get('Content-Type')}")


def provider(port: int, name: str) -> None:
    status, body, _ = request(port, "/v1/models/active", timeout=10)
    active = json.loads(body) if status == 200 else {}
    if active.get("provider") != name:
        raise SystemExit(f"GET /v1/models/active answered {status}: provider {active.get('provider')!r}, not {name!r}")
    print(f"serving {active['version']} with backend {active['backend']} on provider {name}")


def follow(port1: int, port2: int, version: str, key: str, timeout: float) -> None:
    before = serving(port1), serving(port2)
    if before[0] is None or before[0] != before[1]:
        raise SystemExit(f"the two containers serve {before[0]} and {before[1]} before the activation")
    status, body, _ = request(port1, f"/v1/models/{version}/activate", b"",
                              {"Authorization": f"Bearer {key}"}, timeout=300)
    if status != 200 or json.loads(body)["version"] != version:
        raise SystemExit(f"activating {version} on port {port1} answered {status}: {body[:300]!r}")
    started = time.monotonic()
    wait_until(lambda: serving(port2) == version, timeout, f"port {port2} to serve {version}")
    print(f"activated {version} on one container (was {before[0]}); the other served it "
          f"{time.monotonic() - started:.1f} s later")


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "ready":
        ready(int(args[0]), float(args[1]))
    elif command == "segment":
        segment(int(args[0]), Path(args[1]))
    elif command == "provider":
        provider(int(args[0]), args[1])
    elif command == "follow":
        follow(int(args[0]), int(args[1]), args[2], args[3], float(args[4]))
    else:
        raise SystemExit(f"unknown check {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
