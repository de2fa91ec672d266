"""Registry names and links (issue 10, defects 8 and 12): ASCII-only version names, symbolic links are
never versions, and the temp names of a publisher that died are swept at start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from models.atomic import TEMP_PREFIX
from service.registry import ACTIVE_FILE, InvalidVersion, ModelRegistry, VersionNotFound, validate_version


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name", ["v٠٠٠١", "v۱۲۳۴", "v00१1", "v０００１"])
def test_unicode_digits_are_not_version_names(name: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(InvalidVersion):
        validate_version(name)
    reg = ModelRegistry(tmp_path / "models")
    reg.import_dir(tiny_checkpoint, activate=True)
    shutil.copytree(reg.path("v0001"), reg.root / name.strip())
    assert reg.versions() == ["v0001"]
    with pytest.raises(InvalidVersion):
        reg.activate(name)


def test_symlinked_versions_are_neither_listed_nor_activated(tmp_path: Path, tiny_checkpoint: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.import_dir(tiny_checkpoint, activate=True)
    outside = tmp_path / "outside"
    shutil.copytree(tiny_checkpoint, outside)  # a complete checkpoint outside the registry
    (reg.root / "v0002").symlink_to(outside, target_is_directory=True)
    (reg.root / "v0003").symlink_to("/etc", target_is_directory=True)
    assert reg.versions() == ["v0001"]
    for version in ("v0002", "v0003"):
        with pytest.raises(VersionNotFound):
            reg.activate(version)
    assert reg.active() == "v0001"


def test_temp_names_of_a_dead_publisher_are_swept_at_start(tmp_path: Path, tiny_checkpoint: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.import_dir(tiny_checkpoint, activate=True)
    host, hexid = socket.gethostname(), "ab" * 16
    dead = f".staging-{dead_pid()}@{host}-{hexid}"
    leftovers = [reg.root / dead, reg.root / f".{dead}.tmp3k2j1x",  # save_checkpoint's temp beside the staging
                 reg.root / f"..staging-{'cd' * 16}.tmpq8z0"]  # the name older versions left (no owner)
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(leftovers[2], (old, old))
    # a temp pointer as named now, and as older versions named it
    for pointer in (reg.root / f"{TEMP_PREFIX}{ACTIVE_FILE}.x1y2z3", reg.root / f".{ACTIVE_FILE}.x4y5z6"):
        pointer.write_text("v0001\n")
        os.utime(pointer, (old, old))
    alive = reg.root / f".staging-{os.getpid()}@{host}-{'ef' * 16}"  # this process is still publishing it
    alive.mkdir()
    reg.ensure()
    assert sorted(p.name for p in reg.root.iterdir()) == sorted(["ACTIVE", "v0001", alive.name])


def test_publish_names_its_staging_directory_after_its_owner(tmp_path: Path, tiny_checkpoint: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from models import checkpoint

    reg = ModelRegistry(tmp_path / "models")
    seen: list[str] = []
    real = checkpoint.save_checkpoint

    def spy(directory, model, meta):
        seen.append(Path(directory).name)
        return real(directory, model, meta)

    monkeypatch.setattr("service.registry.save_checkpoint", spy)
    model, meta = checkpoint.load_checkpoint(tiny_checkpoint)
    assert reg.publish(model, meta) == "v0001"
    assert seen and seen[0].startswith(f".staging-{os.getpid()}@")
