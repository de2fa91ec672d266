"""The CLI's rough edges of issue 14: fast help and --version, output formats from the suffix, label/frame
count mismatches in eval, `vss models` listing and directories, progress bars, thread pinning."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main

REPO = Path(__file__).resolve().parents[2]


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


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_help_and_version_do_not_import_torch() -> None:
    from adaptation.sourcefree import SOURCE_FREE
    from service.commands.adapt import METHODS

    assert METHODS == SOURCE_FREE
    script = ("import sys\nfrom service.cli import COMMANDS, main\n"
              "for argv in [['--help'], ['--version']] + [[c, '--help'] for c in COMMANDS] + [['models', 'list', "
              "'--help']]:\n    try:\n        main(argv)\n    except SystemExit as e:\n"
              "        assert e.code == 0, argv\n"
              "print('TORCH', 'torch' in sys.modules, 'cv2' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "TORCH False False"
    assert re.search(r"^vss \d+\.\d+", done.stdout, re.M)
    for name in ("segment", "adapt", "models", "--threads", "--no-progress", "--server", "--allow-mismatch"):
        assert name in done.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"vss {version('vss')}"


@pytest.mark.parametrize(("name", "extra", "fragment"), [
    ("x.avi", [], "cannot tell the output format from 'x.avi'"),
    ("x.mp4", ["--format", "zip"], "--format zip but the output is named x.mp4"),
])
def test_output_suffix_must_name_the_format(name: str, extra: list[str], fragment: str, tiny_checkpoint: Path,
                                            synthetic_video, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / name, "--checkpoint",
                         tiny_checkpoint, *extra)
    one_line_error(code, err, fragment)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_output_without_known_suffix_takes_format(tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "stats.out", "--format", "json",
                         "--checkpoint", tiny_checkpoint, "--flow", "none", "--max-frames", "2")
    assert code == 0, err
    assert json.loads(out)["format"] == "json" and json.loads((tmp_path / "stats.out").read_text())["frames"]


def write_labels(directory: Path, labels: np.ndarray, count: int) -> Path:
    directory.mkdir()
    for i in range(count):
        Image.fromarray(labels[i % len(labels)]).save(directory / f"{i:06d}.png")
    return directory


@pytest.mark.parametrize("count", [12, 3])
def test_eval_label_count_mismatch_is_an_error(count: int, tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    labels = write_labels(tmp_path / "labels", synthetic_video.labels, count)
    args = ["eval", "--video", synthetic_video.path, "--labels", labels, "--checkpoint", tiny_checkpoint,
            "--flow", "none"]
    code, out, err = run(capsys, *args)
    one_line_error(code, err, f"the labels do not match the video: {count} label PNGs")
    assert "but 6 frames" in err and "--allow-mismatch" in err and out == ""
    code, out, err = run(capsys, *args, "--allow-mismatch")
    assert code == 0, err
    assert json.loads(out)["frames"] == min(count, 6)
    assert err.startswith("vss: warning: the labels do not match the video") and "--allow-mismatch" in err
    code, out, err = run(capsys, *args, "--max-frames", str(min(count, 6)))  # the first frames match
    assert code == 0 and err == "" and json.loads(out)["frames"] == min(count, 6)


def test_eval_label_gap_is_an_error(tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    labels = write_labels(tmp_path / "labels", synthetic_video.labels, 6)
    (labels / "000002.png").unlink()
    code, _, err = run(capsys, "eval", "--video", synthetic_video.path, "--labels", labels, "--checkpoint",
                       tiny_checkpoint)
    one_line_error(code, err, "have a gap: 000002.png is missing")


def columns(line: str) -> list[int]:
    return [m.start() for m in re.finditer(r"(?:(?<=  )|^)\S", line)]


def test_models_list_names_the_parent_version_and_aligns_columns(tiny_checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An adapted checkpoint records its parent's directory and weights hash; imported next to that parent,
    the registry names the parent by version, and the columns stay aligned."""
    adapted = tmp_path / "a-rather-long-directory-name" / "adapted"
    shutil.copytree(tiny_checkpoint, adapted)
    meta = json.loads((adapted / "meta.json").read_text())
    parent_sha = json.loads((tiny_checkpoint / "meta.json").read_text())["sha256"]
    meta["parent"] = str(tiny_checkpoint.resolve())
    meta["provenance"] = {**meta["provenance"], "parent_sha256": parent_sha, "method": "tent"}
    (adapted / "meta.json").write_text(json.dumps(meta))
    root = tmp_path / "models"
    assert run(capsys, "models", "--model-dir", root, "import", tiny_checkpoint, "--activate")[0] == 0
    code, out, _ = run(capsys, "models", "--model-dir", root, "import", adapted)
    assert code == 0 and "as v0002" in out and "parent v0001" in out
    stored = json.loads((root / "v0002" / "meta.json").read_text())
    assert stored["parent"] == "v0001" and stored["provenance"]["parent_path"] == str(tiny_checkpoint.resolve())
    code, out, err = run(capsys, "models", "--model-dir", root, "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and f"models in {root} (--model-dir)" in err
    assert lines[1].startswith("* v0001") and re.match(r"  v0002 +v0001 +20", lines[2])
    header = columns(lines[0][2:])
    assert len(header) == 8  # ... ONNX DOMAIN
    for row in lines[1:]:
        assert columns(row[2:]) == header, (lines[0], row)


def test_models_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from service.commands.models import default_model_dir

    home = tmp_path / "elsewhere"
    home.mkdir()
    monkeypatch.chdir(home)
    monkeypatch.delenv("VSS_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and out.startswith(f"no model versions in {tmp_path / 'data' / 'vss' / 'models'}")
    assert "the user data directory" in out and not (home / "var").exists()
    (home / "var" / "models").mkdir(parents=True)
    assert default_model_dir()[0] == home / "var" / "models"
    monkeypatch.setenv("VSS_MODEL_DIR", str(tmp_path / "m"))
    assert default_model_dir() == (tmp_path / "m", "$VSS_MODEL_DIR")
    assert default_model_dir({}, home)[0] == home / "var" / "models"


def run_on_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (stdout a pipe); returns (status, stdout, terminal output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=cli_env(), text=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tiny_checkpoint: Path, synthetic_video, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "service.cli", "segment", str(synthetic_video.path), "--checkpoint",
            str(tiny_checkpoint), "--flow", "none"]
    code, out, terminal = run_on_terminal([*base, "-o", str(tmp_path / "a.json")])
    assert code == 0, terminal
    assert json.loads(out)["frames"] == 6
    assert re.search(r"segment: 100%.*6/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(frame/s|s/frame)\]", terminal), terminal
    code, out, terminal = run_on_terminal([*base, "-o", str(tmp_path / "b.json"), "--no-progress"])
    assert code == 0 and "frame/s" not in terminal and "6/6" not in terminal, terminal
    piped = subprocess.run([*base, "-o", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=300,
                           env=cli_env())
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_threads_are_pinned(tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    import cv2
    import torch

    from service.threads import default_threads

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        code, _, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "a.json", "--checkpoint",
                           tiny_checkpoint, "--flow", "none", "--max-frames", "1", "--threads", "2")
        assert code == 0, err
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (2, 2)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
    code, _, err = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "b.json", "--threads", "0")
    one_line_error(code, err, "--threads must be >= 1")
    assert default_threads({}, cpus=2) == 1 and default_threads({}, cpus=16) == 8 and default_threads({}, 1) == 1
    assert default_threads({"VSS_INTRA_OP_THREADS": "3", "OMP_NUM_THREADS": "5"}, 16) == 3
    assert default_threads({"VSS_INTRA_OP_THREADS": "0", "OMP_NUM_THREADS": "5"}, 16) == 5
    script = ("import os\nfrom service.threads import pin_threads\npin_threads(3)\nimport torch\n"
              "print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.split() == ["3", "3", "3"], done.stderr
