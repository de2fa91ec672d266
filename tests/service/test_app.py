"""Routes through ``create_app`` with a real registry in a temp dir: models, auth, health, metrics, errors."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.metrics import JsonFormatter, request_id_var
from service.registry import ModelRegistry
from service.settings import Settings
from tests.waiting import wait_until

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = {"model_dir": tmp_path / "models", "buffer_dir": tmp_path / "buffer", "cache_dir": tmp_path / "cache",
            "job_dir": tmp_path / "jobs", "demo_model": None, "api_key": API_KEY, "registry_poll_ms": 50,
            "intra_op_threads": 1, "engine": "torch", "device": "cpu"}
    return Settings(_env_file=None, **{**base, **overrides})


def wait_ready(client: TestClient, timeout: float = 20.0) -> dict:
    def ready() -> dict | None:
        r = client.get("/readyz")
        return r.json() if r.status_code == 200 else None
    return wait_until(ready, timeout, "/readyz to answer 200", 0.02)


@pytest.fixture()
def client(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[TestClient]:
    reg = ModelRegistry(tmp_path / "models")
    reg.import_dir(tiny_checkpoint, activate=True)
    shutil.copytree(reg.path("v0001"), reg.root / "v0002")
    with TestClient(create_app(make_settings(tmp_path))) as c:
        wait_ready(c)
        yield c


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": "v0001", "backend": "torch"}


def test_not_ready_without_a_model(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert c.get("/v1/models/active").status_code == 503
        assert c.get("/v1/models").json() == {"active": None, "serving": None, "versions": []}


def test_first_start_seeds_the_registry_from_the_demo_model(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, demo_model=tiny_checkpoint))) as c:
        assert wait_ready(c)["model_version"] == "v0001"
        listing = c.get("/v1/models").json()
        assert listing["active"] == "v0001" and listing["versions"][0]["provenance"]["source"] == "test-random-init"


def test_list_and_describe_models(client: TestClient) -> None:
    listing = client.get("/v1/models").json()
    assert listing["active"] == listing["serving"] == "v0001"
    assert [v["version"] for v in listing["versions"]] == ["v0001", "v0002"]
    first = listing["versions"][0]
    assert first["active"] and first["serving"] and first["input_size"] == [64, 128]
    assert len(first["classes"]) == 7 and first["architecture"]["backbone"] == "resnet-mini"
    assert client.get("/v1/models/v0002").json()["active"] is False
    active = client.get("/v1/models/active").json()
    assert active["version"] == "v0001" and active["backend"] == "torch" and active["swaps"] == 0


def test_activate_needs_the_api_key(client: TestClient) -> None:
    r = client.post("/v1/models/v0002/activate")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/models/v0002/activate", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.post("/v1/models/v0002/activate", headers={"Authorization": f"Basic {API_KEY}"})
    assert r.status_code == 401
    assert client.get("/v1/models/active").json()["version"] == "v0001"


def test_activate_and_roll_back(client: TestClient, tmp_path: Path) -> None:
    r = client.post("/v1/models/v0002/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v0002" and r.json()["swaps"] == 1
    assert (tmp_path / "models" / "ACTIVE").read_text().strip() == "v0002"
    assert client.get("/readyz").json()["model_version"] == "v0002"
    r = client.post("/v1/models/v0001/activate", headers=AUTH)
    assert r.json()["version"] == "v0001" and r.json()["model"]["active"]
    assert (tmp_path / "models" / "ACTIVE").read_text().strip() == "v0001"


@pytest.mark.parametrize(("version", "status", "code"), [
    ("v0009", 404, "version_not_found"),
    ("v1", 422, "invalid_version"),
    ("v0001.tmp", 422, "invalid_version"),
    ("..", 404, "not_found"),  # these never reach the registry: the URL path does not match the route
    ("v0001%2F..%2F..", 404, "not_found"),
])
def test_activate_rejects_unknown_and_invalid_versions(client: TestClient, version: str, status: int,
                                                       code: str) -> None:
    r = client.post(f"/v1/models/{version}/activate", headers=AUTH)
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert client.get("/v1/models/active").json()["version"] == "v0001"


def test_version_that_fails_to_load_is_a_409_and_changes_nothing(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "models" / "v0002" / "model.safetensors").write_bytes(b"garbage")
    r = client.post("/v1/models/v0002/activate", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "load_failed"
    assert (tmp_path / "models" / "ACTIVE").read_text().strip() == "v0001"
    active = client.get("/v1/models/active").json()
    assert active["version"] == "v0001" and active["swap_failures"] == 1 and not active["last_swap"]["ok"]


def test_no_api_key_configured_means_open_routes(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ModelRegistry(tmp_path / "models").seed(tiny_checkpoint)
    shutil.copytree(tmp_path / "models" / "v0001", tmp_path / "models" / "v0002")
    with TestClient(create_app(make_settings(tmp_path, api_key=None))) as c:
        wait_ready(c)
        assert c.post("/v1/models/v0002/activate").status_code == 200


def test_replica_follows_a_pointer_moved_on_disk(client: TestClient, tmp_path: Path) -> None:
    ModelRegistry(tmp_path / "models").activate("v0002")  # e.g. the worker, or `vss models activate`
    wait_until(lambda: client.get("/v1/models/active").json()["version"] == "v0002", 10,
               "the watcher to follow ACTIVE", 0.02)


def test_errors_are_json_with_a_request_id(client: TestClient) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = client.delete("/healthz")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_unhandled_exceptions_become_json_500(client: TestClient) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/boom", boom)
    r = client.get("/boom", headers={"X-Request-ID": "req-42"})
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "internal server error",
                                  "request_id": "req-42"}}
    assert r.headers["x-request-id"] == "req-42"
    assert client.get("/healthz").status_code == 200


def test_request_ids_are_kept_or_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/healthz").headers["x-request-id"]


def test_requests_are_logged_with_their_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="vss.http"):  # a successful poll route: logged at debug level
        client.get("/v1/models", headers={"X-Request-ID": "log-me"})
    record = next(r for r in caplog.records if getattr(r, "route", None) == "/v1/models")
    line = json.loads(JsonFormatter().format(record))
    assert line["status"] == 200 and line["method"] == "GET" and line["msg"].startswith("GET /v1/models")
    assert "duration_ms" in line


def test_json_formatter_adds_the_request_id() -> None:
    token = request_id_var.set("rid-7")
    try:
        record = logging.LogRecord("vss.test", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "hello you" and line["level"] == "warning" and line["request_id"] == "rid-7"


def test_metrics_expose_requests_frames_and_the_model(client: TestClient) -> None:
    client.get("/healthz")
    client.post("/v1/models/v0002/activate", headers=AUTH)
    client.app.state.metrics.frames_segmented.labels(source="upload").inc(5)
    text = client.get("/metrics").text
    assert 'vss_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert 'vss_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
    assert 'vss_frames_segmented_total{source="upload"} 5.0' in text
    assert 'vss_frames_dropped_total{reason="stale"} 0.0' in text
    assert 'vss_model_info{active_pointer="v0002",backend="torch",version="v0002"} 1.0' in text
    assert 'vss_model_active{version="v0002"} 1.0' in text
    assert "vss_model_swaps_total 1.0" in text and "vss_model_swap_failures_total 0.0" in text
    assert "vss_model_ready 1.0" in text


def test_many_apps_in_one_process_have_separate_metrics(tmp_path: Path) -> None:
    apps = [create_app(make_settings(tmp_path / str(i))) for i in range(3)]
    apps[0].state.metrics.frames_segmented.labels(source="stream").inc()
    assert b'vss_frames_segmented_total{source="stream"} 1.0' in apps[0].state.metrics.render()
    assert b'vss_frames_segmented_total{source="stream"} 0.0' in apps[1].state.metrics.render()


def test_openapi_documents_the_routes_and_the_bearer_scheme(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "adapts" in spec["info"]["description"]
    for path in ("/v1/models", "/v1/models/active", "/v1/models/{version}/activate", "/healthz", "/readyz"):
        assert path in spec["paths"]
    assert spec["paths"]["/v1/models/{version}/activate"]["post"]["security"] == [{"HTTPBearer": []}]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VSS_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("VSS_API_KEY", "from-env")
    monkeypatch.setenv("VSS_ENGINE", "onnx")
    monkeypatch.setenv("VSS_DEMO_MODEL", "none")
    monkeypatch.setenv("VSS_MAX_FRAMES", "12")
    s = Settings()
    assert (s.model_dir, s.api_key_value(), s.engine, s.demo_model, s.max_frames) == \
        (tmp_path / "m", "from-env", "onnx", None, 12)
    assert Settings(engine="torch").engine == "torch"  # explicit arguments (CLI flags) win
    monkeypatch.setenv("VSS_ENGINE", "tensorflow")
    with pytest.raises(ValueError, match="engine"):
        Settings()


def test_intra_op_threads_setting_applies_to_torch(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    try:
        with TestClient(create_app(make_settings(tmp_path, intra_op_threads=1))):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
