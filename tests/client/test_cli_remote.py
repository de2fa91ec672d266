"""`vss segment|models|adapt --server URL`: the CLI against a live server, through vss_client."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from service.cli import main
from tests.client.servers import API_KEY, Server, write_clip


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vss: error:") and fragment in lines[0], err


def test_segment_on_a_server(server: Server, synthetic_video, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "result.zip"
    code, out, err = run(capsys, "segment", synthetic_video.path, "-o", out_path, "--server", server.url)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames"] == 6 and summary["format"] == "zip" and summary["server"] == server.url
    assert summary["job"] and summary["model_version"] == "v0001"  # 6 frames > the threshold of 3: a job
    assert out_path.stat().st_size > 0 and [p.name for p in tmp_path.iterdir()] == ["result.zip"]
    code, out, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "r.json", "--server", server.url,
                         "--max-frames", "2")
    assert code == 0 and json.loads(out)["job"] is None and json.loads((tmp_path / "r.json").read_text())["frames"]


def test_segment_server_errors_are_one_line(server: Server, synthetic_video, tmp_path: Path, tiny_checkpoint: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    code, _, err = run(capsys, "segment", bad, "-o", tmp_path / "o.zip", "--server", server.url)
    one_line_error(code, err, "415 unsupported_media_type")
    assert "(request " in err
    code, _, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "o.zip", "--server", server.url,
                       "--checkpoint", tiny_checkpoint)
    one_line_error(code, err, "--checkpoint apply to local runs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        code, _, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "o.zip", "--server", url)
    one_line_error(code, err, "cannot reach")
    code, _, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "o.zip", "--server", "localhost:1")
    one_line_error(code, err, "must start with http://")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_models_on_a_server(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "models", "--server", server.url, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:2] == ["VERSION", "PARENT"] and lines[1].startswith("* v0001")
    assert f"models on {server.url}" in err
    code, out, _ = run(capsys, "models", "list", "--json", "--server", server.url)
    assert code == 0 and json.loads(out)["active"] == "v0001" and json.loads(out)["server"] == server.url
    code, _, err = run(capsys, "models", "--server", server.url, "activate", "v0001")
    one_line_error(code, err, "401 unauthorized")
    code, out, _ = run(capsys, "models", "--server", server.url, "--api-key", API_KEY, "activate", "v0001")
    assert code == 0 and out.strip() == f"v0001 is now active on {server.url}"
    code, _, err = run(capsys, "models", "--server", server.url, "import", "/tmp")
    one_line_error(code, err, "run it where the model directory is")
    code, _, err = run(capsys, "models", "--server", server.url, "--model-dir", "/tmp", "list")
    one_line_error(code, err, "not both")


def test_adapt_on_a_server(server: Server, synthetic_video, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "adapt", "--server", server.url, "-o", tmp_path / "x")
    one_line_error(code, err, "-o/--out apply to local runs")
    videos = [write_clip(tmp_path / f"t{seed}.mp4", seed) for seed in range(4)]  # 4 clips, some held out
    code, out, err = run(capsys, "adapt", "--server", server.url, "--api-key", API_KEY, "--method", "bn",
                         "--steps", "2", "--video", *videos)
    assert code in (0, 3), err
    job = json.loads(out)
    assert job["state"] == ("published" if code == 0 else "rejected") and job["method"] == "bn"
    assert "clips added to the server's buffer" in err
    if code == 3:
        assert "gate rejected" in err
    code, _, err = run(capsys, "adapt")
    one_line_error(code, err, "adapt needs -o OUT")
