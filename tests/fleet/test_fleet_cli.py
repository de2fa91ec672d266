"""`vss models list|import|activate --model-dir s3://...` against the test S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main
from tests.s3server import SeaweedServer


@pytest.fixture
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VSS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no .env file of the developer's


def test_models_commands_on_s3(s3_env: None, s3_url: str, tiny_checkpoint: Path, capsys) -> None:
    assert main(["models", "--model-dir", s3_url, "list"]) == 0
    assert "no model versions in s3://" in capsys.readouterr().out
    assert main(["models", "import", str(tiny_checkpoint), "--activate", "--model-dir", s3_url]) == 0
    assert main(["models", "import", str(tiny_checkpoint), "--model-dir", s3_url]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["models", "activate", "v0002", "--model-dir", s3_url]) == 0
    assert f"v0002 is now active in {s3_url}" in capsys.readouterr().out
    assert main(["models", "list", "--json", "--model-dir", s3_url]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["root"] == s3_url and listing["active"] == "v0002"
    assert [v["version"] for v in listing["versions"]] == ["v0001", "v0002"]
    assert main(["models", "activate", "v0007", "--model-dir", s3_url]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vss: error: model version v0007 does not exist in {s3_url}"


def test_unreachable_store_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    from tests.s3server import free_ports

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "x")
    assert main(["models", "list", "--model-dir", "s3://vss-test/none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vss: error: object store s3://vss-test/none: ") and err.count("\n") == 1


def test_bad_store_url_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["models", "list", "--model-dir", "s3://x/models"]) == 2
    assert "invalid bucket name 'x'" in capsys.readouterr().err
