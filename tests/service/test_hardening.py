"""Hostile and unlucky requests (issue 10, part A): the request budget, non-finite numbers, adaptation
options, internals in answers, and an OpenAPI schema that states what the routes enforce."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.waiting import wait_until

API_KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"content-type": "application/json", **AUTH}


def settings_for(root: Path, **overrides: Any) -> Settings:
    base = {"model_dir": root / "models", "buffer_dir": root / "buffer", "cache_dir": root / "cache",
            "job_dir": root / "jobs", "demo_model": None, "api_key": API_KEY, "registry_poll_ms": 50,
            "intra_op_threads": 1, "device": "cpu", "flow": "dis-ultrafast", "worker": "off",
            "buffer_enabled": False}
    return Settings(_env_file=None, **{**base, **overrides})


@pytest.fixture()
def client(tmp_path: Path, start_client: Callable[[Settings], TestClient]) -> TestClient:
    return start_client(settings_for(tmp_path))


def error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    return body


# --- non-finite numbers and adaptation options (defects 5 and 6) ---------------------------------------------


@pytest.mark.parametrize("body", [b'{"method": "tent", "lr": NaN}', b'{"method": "tent", "time_budget_s": Infinity}',
                                  b'{"method": "tent", "lr": -Infinity}'])
def test_non_finite_numbers_are_a_422(client: TestClient, body: bytes) -> None:
    found = error(client.post("/v1/adapt", content=body, headers=JSON), 422, "invalid_request")
    assert "finite" in found["message"]
    json.dumps(found, allow_nan=False)  # the answer itself is valid JSON


@pytest.mark.parametrize("options, name", [
    ({"dim": "abc"}, "dim"), ({"dim": 10**9}, "dim"), ({"dim": 64.5}, "dim"), ({"proportion": 0}, "proportion"),
    ({"temperature": float("inf")}, "temperature"), ({"fusion": "magic"}, "fusion"), ({"bn_train": "yes"}, "bn_train"),
    ({"ema_momentum": 1.5}, "ema_momentum"), ({"no_such_option": 1}, "no_such_option"),
])
def test_stpl_options_are_checked_against_their_declaration(client: TestClient, options: dict, name: str) -> None:
    body = json.dumps({"method": "stpl", "options": options}).encode()  # Infinity as JSON writes it
    found = error(client.post("/v1/adapt", content=body, headers=JSON), 422, "invalid_options")
    assert found["details"] == {"option": name} and repr(name) in found["message"]


def test_every_source_free_method_declares_its_options() -> None:
    from adaptation.methods import build_method, method_class
    from adaptation.options import OptionError
    from adaptation.sourcefree import SOURCE_FREE

    for method in SOURCE_FREE:
        assert method_class(method).OPTIONS, method  # something a job may set, with type and bounds
        build_method(method)  # the defaults are valid
        with pytest.raises(OptionError) as caught:
            build_method(method, not_an_option=1)
        assert caught.value.name == "not_an_option"


def test_budgets_of_an_adaptation_job(client: TestClient) -> None:
    settings = client.app.state.settings
    found = error(client.post("/v1/adapt", json={"method": "tent", "time_budget_s": settings.adapt_max_time_s + 1},
                              headers=AUTH), 422, "invalid_request")
    assert "VSS_ADAPT_MAX_TIME_S" in found["message"]
    big = b'{"method": "tent", "options": {"x": "' + b"a" * (2 << 20) + b'"}}'
    error(client.post("/v1/adapt", content=big, headers=JSON), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once it passes the limit
        yield b'{"method": "tent", "options": {"x": "'
        for _ in range(40):
            yield b"a" * 65536

    error(client.post("/v1/adapt", content=chunks(), headers=JSON), 413, "payload_too_large")
    error(client.post("/v1/adapt", content=b'{"method":' + b"[" * 5000, headers=JSON), 400, "bad_request")


# --- pixel budget of uploads and clip images (defects 1 and 4) ------------------------------------------------


def test_upload_inference_size_fits_the_budget(tmp_path: Path, start_client, synthetic_video) -> None:
    client = start_client(settings_for(tmp_path, max_inference_pixels=256 * 512))
    video = {"video": ("clip.mp4", synthetic_video.path.read_bytes(), "video/mp4")}
    found = error(client.post("/v1/segment?format=json&size=512x1024", files=video), 422, "too_many_pixels")
    assert "VSS_MAX_INFERENCE_PIXELS" in found["message"]
    assert client.post("/v1/segment?format=json&size=256x512", files=video).status_code == 200


def test_upload_label_maps_fit_the_pixel_budget(tmp_path: Path, start_client, synthetic_video) -> None:
    h, w = synthetic_video.frames[0].shape[:2]
    client = start_client(settings_for(tmp_path, max_pixels=h * w - 1))
    video = {"video": ("clip.mp4", synthetic_video.path.read_bytes(), "video/mp4")}
    found = error(client.post("/v1/segment?format=zip", files=video), 422, "resolution_too_large")
    assert "VSS_MAX_PIXELS" in found["message"]


def test_clip_images_decode_at_the_size_they_are_stored_at(tmp_path: Path,
                                                           start_client: Callable[[Settings], TestClient]) -> None:
    from service.routes.clips import _decode_flag

    client = start_client(settings_for(tmp_path, buffer_enabled=True))  # VSS_BUFFER_ENABLED=false refuses clips

    big = np.zeros((1024, 2048, 3), np.uint8)
    big[:, :1024] = (200, 30, 30)
    jpeg = cv2.imencode(".jpg", big)[1].tobytes()
    assert _decode_flag("jpeg", jpeg, (64, 128)) == cv2.IMREAD_REDUCED_COLOR_8
    assert _decode_flag("jpeg", jpeg, (300, 600)) == cv2.IMREAD_REDUCED_COLOR_2
    assert _decode_flag("jpeg", jpeg, (1024, 2048)) == cv2.IMREAD_COLOR
    files = [("images", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(3)]
    r = client.post("/v1/clips?clip_frames=3", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    assert [(c["frames"], c["height"], c["width"]) for c in r.json()["added"]] == [(3, 64, 128)]
    over = client.app.state.settings.ws_max_message_bytes + 1
    files = [("images", ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * over, "image/png"))] * 2
    error(client.post("/v1/clips", files=files, headers=AUTH), 413, "payload_too_large")


# --- no internals in answers (defect 11, build 5) ------------------------------------------------------------

ABSOLUTE_PATH = re.compile(r"(?<![\w:/])/(?:tmp|root|home|work|srv|var|usr|etc|proc|opt|mnt|data)\b")
PRIVATE_KEYS = {"pid", "host", "hostname", "path", "cwd"}


def internals(value: Any, secrets: list[str], pids: set[int], where: str = "") -> list[str]:
    """Where ``value`` (a JSON answer) shows a filesystem path, a secret string, a pid or a host name."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in PRIVATE_KEYS:
                found.append(f"{where}.{key}")
            found += internals(item, secrets, pids, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += internals(item, secrets, pids, f"{where}[{i}]")
    elif isinstance(value, str):
        if ABSOLUTE_PATH.search(value) or any(s in value for s in secrets) or re.search(r"\bpid\b", value):
            found.append(f"{where}={value!r}")
    elif isinstance(value, int) and value in pids:
        found.append(f"{where}={value}")
    return found


def test_answers_name_no_paths_pids_or_hosts(tmp_path: Path, start_client, synthetic_video) -> None:
    client = start_client(settings_for(tmp_path, worker="spawn", adapt_heartbeat_s=0.2))
    registry = client.app.state.registry
    broken = registry.root / "v0002"  # a version whose weights do not match its metadata
    broken.mkdir()
    (broken / "meta.json").write_text((registry.root / "v0001" / "meta.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    answers = {
        "unknown version": client.get("/v1/models/v0099"),
        "activate unknown": client.post("/v1/models/v0099/activate", headers=AUTH),
        "activate broken": client.post("/v1/models/v0002/activate", headers=AUTH),
        "invalid version": client.get("/v1/models/v1"),
        "models": client.get("/v1/models"),
        "active": client.get("/v1/models/active"),
        "unknown job": client.get("/v1/jobs/" + "0" * 32),
        "unknown adapt job": client.get("/v1/adapt/" + "0" * 32),
        "bad upload": client.post("/v1/segment", files={"video": ("x.mp4", b"\0" * 4096, "video/mp4")}),
        "no key": client.post("/v1/clips"),
        "bad options": client.post("/v1/adapt", json={"method": "stpl", "options": {"dim": "abc"}}, headers=AUTH),
    }
    assert answers["activate broken"].status_code == 409, answers["activate broken"].text
    supervisor = client.app.state.adaptation.supervisor
    supervisor.start()
    wait_until(lambda: client.app.state.adaptation.jobs.workers(5.0), 60, "a worker heartbeat")
    answers["adapt jobs"] = client.get("/v1/adapt")
    secrets = [str(tmp_path), str(Path.cwd()), socket.gethostname(), API_KEY]
    pids = {os.getpid(), supervisor.pid}
    leaks = {name: found for name, r in answers.items()
             if (found := internals(r.json(), secrets, pids))}
    assert leaks == {}


def test_the_demo_model_metadata_names_no_build_machine_path() -> None:
    from models.config import DEMO_MODEL_DIR

    meta = json.loads((DEMO_MODEL_DIR / "meta.json").read_text())
    assert internals(meta, [], set()) == []


def test_redact_keeps_routes_and_names() -> None:
    from service.redact import redact

    assert redact("model.safetensors missing in /srv/vss/models/v0003/") == "model.safetensors missing in v0003"
    assert redact("x: var/models/v0002/model.safetensors: bad") == "x: model.safetensors: bad"
    kept = "POST /v1/clips as multipart/form-data, or ws://HOST/v1/stream; 1/2"
    assert redact(kept) == kept


# --- the OpenAPI schema states what the routes enforce (defect 13) -------------------------------------------


def test_openapi_declares_answers_and_limits(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    settings = client.app.state.settings
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            if op.get("security"):
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    for path in ("/v1/segment", "/v1/clips"):
        assert {"400", "413", "415", "422"} <= set(schema["paths"][path]["post"]["responses"]), path
    assert {"400", "413", "422"} <= set(schema["paths"]["/v1/adapt"]["post"]["responses"])
    version = schema["paths"]["/v1/models/{version}/activate"]["post"]["parameters"][0]["schema"]
    assert version["pattern"] == "^v[0-9]{4,}$"
    params = {p["name"]: p["schema"] for p in schema["paths"]["/v1/segment"]["post"]["parameters"]}
    assert params["max_frames"]["anyOf"][0]["maximum"] == settings.max_frames
    assert re.fullmatch(params["size"]["pattern"], "256x512") and not re.fullmatch(params["size"]["pattern"], "256")
    request = schema["components"]["schemas"]["AdaptRequest"]["properties"]
    assert request["steps"]["maximum"] == settings.adapt_max_steps
    assert request["time_budget_s"]["anyOf"][0]["maximum"] == settings.adapt_max_time_s
