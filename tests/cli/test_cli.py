"""The `vss` CLI in-process (service.cli.main) plus one run of the installed console script."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and fragment in lines[0], err
    assert "Traceback" not in err


def test_synth_writes_video_labels_and_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adaptation.synth import generate_clip
    from models.flow import load_davsn_flow
    from service.video_io import probe_video

    code, out, _ = run(capsys, "synth", "--style", "fog", "--frames", "4", "--size", "48x96", "--seed", "5",
                       "-o", tmp_path / "clip.mp4", "--labels", tmp_path / "labels", "--flow", tmp_path / "flow")
    assert code == 0 and json.loads(out)["frames"] == 4
    clip = generate_clip("fog", frames=4, size=(48, 96), seed=5)
    info = probe_video(tmp_path / "clip.mp4")
    assert (info.frames, info.height, info.width, info.fps) == (4, 48, 96, 10.0)
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    with Image.open(tmp_path / "labels" / "000002.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), clip.labels[2])
    np.testing.assert_array_equal(np.load(tmp_path / "flow" / "000003.npy"), clip.flow[3])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    code, _, _ = run(capsys, "synth", "--style", "source", "--frames", "2", "--size", "48x96", "-o",
                     tmp_path / "b.mp4", "--labels", tmp_path / "lb", "--flow", tmp_path / "fd",
                     "--flow-format", "davsn")
    assert code == 0
    raw = np.load(tmp_path / "fd" / "000001.npy")
    assert raw.dtype == np.int16 and raw.shape == (24, 48, 2)
    decoded = load_davsn_flow(tmp_path / "fd" / "000001.npy", size=(48, 96))
    exact = generate_clip("source", frames=2, size=(48, 96), seed=0).flow[1]
    assert np.abs(decoded - exact)[4:-4, 4:-4].mean() < 0.3


def test_synth_list_styles_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "synth", "--list-styles")
    assert code == 0 and out.split()[0] == "source" and "fog" in out.split()
    code, _, err = run(capsys, "synth", "--style", "mars", "-o", tmp_path / "a.mp4", "--labels", tmp_path / "l")
    assert_one_line_error(code, err, "unknown style 'mars'")
    code, _, err = run(capsys, "synth", "--style", "fog", "--size", "big", "-o", tmp_path / "a.mp4",
                       "--labels", tmp_path / "l")
    assert_one_line_error(code, err, "expected HxW")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["zip", "mp4", "json"])
def test_segment_formats(fmt: str, tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / f"result.{fmt}"
    code, out, err = run(capsys, "segment", synthetic_video.path, "-o", out_path, "--format", fmt,
                         "--checkpoint", tiny_checkpoint, "--flow", "dis")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["frames"] == 6 and summary["model_version"] == "tiny" and summary["format"] == fmt
    assert [p.name for p in tmp_path.iterdir()] == [out_path.name]
    if fmt == "zip":
        with zipfile.ZipFile(out_path) as z:
            names = z.namelist()
            assert names == [f"{i:06d}.png" for i in range(6)] + ["manifest.json"]
            manifest = json.loads(z.read("manifest.json"))
            with Image.open(io.BytesIO(z.read("000005.png"))) as im:
                assert im.mode == "P" and im.size == (128, 64)
                assert np.asarray(im).max() < 7
        assert manifest["frames"] == 6 and len(manifest["per_frame"]) == 6
        assert manifest["classes"][0] == "road" and len(manifest["palette"]) == 7 and manifest["fps"] == 10.0
        assert manifest["model_version"] == "tiny"
        assert sum(manifest["per_frame"][0]["class_fractions"].values()) == pytest.approx(1, abs=1e-4)
    elif fmt == "mp4":
        from service.video_io import probe_video

        info = probe_video(out_path)
        assert (info.frames, info.width, info.height) == (6, 128, 64)
    else:
        doc = json.loads(out_path.read_text())
        assert len(doc["frames"]) == 6 and doc["summary"]["frames"] == 6
        assert set(doc["frames"][0]["class_fractions"]) == set(doc["summary"]["classes"])


def test_segment_format_from_extension_and_stride(tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "segment", synthetic_video.path, "-o", tmp_path / "r.json", "--checkpoint",
                       tiny_checkpoint, "--flow", "none", "--stride", "2", "--max-frames", "2")
    assert code == 0
    summary = json.loads(out)
    assert summary["format"] == "json" and summary["frames"] == 2 and summary["flow"] == "none"


def test_eval_prints_json(tiny_checkpoint: Path, synthetic_video, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from models.classes import label_png

    labels = tmp_path / "labels"
    labels.mkdir()
    for i, lab in enumerate(synthetic_video.labels):
        if i % 2:  # greyscale index PNGs are accepted as well as palette PNGs
            Image.fromarray(lab).save(labels / f"{i:06d}.png")
        else:
            (labels / f"{i:06d}.png").write_bytes(label_png(lab, np.zeros((7, 3), np.uint8)))
    code, out, err = run(capsys, "eval", "--video", synthetic_video.path, "--labels", labels,
                         "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    result = json.loads(out)
    assert result["frames"] == 6 and 0 <= result["miou"] <= 100 and 0 <= result["tc"] <= 100
    assert set(result["per_class"]) == {"road", "sidewalk", "building", "vegetation", "sky", "person", "car"}
    code, _, err = run(capsys, "eval", "--video", synthetic_video.path, "--labels", tmp_path / "none",
                       "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "labels directory not found")


def test_demo(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "demo", "-o", tmp_path / "demo", "--checkpoint", tiny_checkpoint,
                         "--frames", "3", "--size", "48x96")
    assert code == 0, err
    assert "mIoU" in out and str((tmp_path / "demo" / "overlay.mp4").resolve()) in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["input.mp4", "overlay.mp4"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "bad-checkpoint", "no-checkpoint", "bad-format",
                                  "bad-stride", "raft-without-weights", "raft-bad-weights"])
def test_segment_errors_are_one_line_and_leave_no_output(case: str, tiny_checkpoint: Path, synthetic_video,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    video, ckpt, extra = synthetic_video.path, tiny_checkpoint, []
    fragment = {"missing": "video not found", "corrupt": "corrupt, truncated or unsupported",
                "empty": "empty file", "bad-checkpoint": "sha256 does not match",
                "no-checkpoint": "no meta.json", "bad-format": "invalid choice: 'gif'",
                "bad-stride": "expected a positive integer", "raft-without-weights": "--raft-weights",
                "raft-bad-weights": "cannot load RAFT weights"}[case]
    if case == "missing":
        video = work / "nope.mp4"
    elif case in ("corrupt", "empty"):
        video = work / "in.mp4"
        video.write_bytes(np.random.default_rng(0).bytes(20_000) if case == "corrupt" else b"")
    elif case == "bad-checkpoint":
        ckpt = Path(shutil.copytree(tiny_checkpoint, work / "ckpt"))
        with open(ckpt / "model.safetensors", "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"xyz")
    elif case == "no-checkpoint":
        ckpt = work / "empty-ckpt"
        ckpt.mkdir()
    elif case == "bad-format":
        extra = ["--format", "gif"]
    elif case == "bad-stride":
        extra = ["--stride", "0"]
    elif case == "raft-without-weights":
        extra = ["--flow", "raft"]
    else:
        (work / "raft.pth").write_bytes(b"not a pickle at all")
        extra = ["--flow", "raft", "--raft-weights", str(work / "raft.pth")]
    before = sorted(p.name for p in work.iterdir())
    code, out, err = run(capsys, "segment", video, "-o", work / "out.zip", "--checkpoint", ckpt, *extra)
    assert_one_line_error(code, err, fragment)
    assert out == ""
    assert sorted(p.name for p in work.iterdir()) == before  # no output, no temp files


def test_import_davsn_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "import-davsn", tmp_path / "missing.pth", "--classes", "viper", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "checkpoint not found")
    code, _, err = run(capsys, "import-davsn", tmp_path / "x.pth", "--classes", "kitti", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "invalid choice: 'kitti'")
    assert not (tmp_path / "o").exists()


def test_console_script(tiny_checkpoint: Path, synthetic_video, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "vss"
    if not exe.exists():
        pytest.skip("the vss console script is not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([str(exe), "segment", str(synthetic_video.path), "-o", str(tmp_path / "o.json"),
                         "--checkpoint", str(tiny_checkpoint), "--max-frames", "2"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["frames"] == 2 and (tmp_path / "o.json").is_file()
