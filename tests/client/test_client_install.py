"""`pip install ./client` into a fresh virtual environment without torch, then segment and stream against
a live server from it: the client needs none of the server's packages.

Slow (about a minute: a venv, pip and its build dependencies); it stays in the default run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.client.servers import Server

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import importlib.util, sys
    import numpy as np
    import vss_client
    assert importlib.util.find_spec("torch") is None, "torch is importable"
    assert "torch" not in sys.modules and "service" not in sys.modules
    assert importlib.util.find_spec("service") is None, "the server package is importable"
    url, video = sys.argv[1], sys.argv[2]
    with vss_client.Client(url) as vss:
        result = vss.segment(video, format="zip", max_frames=2)
        maps = list(result.label_maps())
        frames = [np.zeros((48, 64, 3), np.uint8), np.full((48, 64, 3), 200, np.uint8)]
        answers = list(vss.stream(frames, format="png"))
    assert len(maps) == 2 and [a.index for a in answers] == [0, 1] and answers[0].labels.shape == (48, 64)
    print("ok", vss_client.__version__, maps[0].shape)
''')


@pytest.mark.slow
def test_client_installs_and_works_without_torch(tmp_path: Path, server: Server, synthetic_video) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO / "client")],
                             capture_output=True, text=True, timeout=600, env=env)
    offline = ("No matching distribution found", "Failed to establish a new connection", "Temporary failure in name")
    if install.returncode != 0 and any(text in install.stderr for text in offline):
        pytest.skip(f"pip cannot reach a package index here: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stdout + install.stderr
    run = subprocess.run([str(python), "-c", SCRIPT, server.url, str(synthetic_video.path)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.split() == ["ok", "0.1.0", "(64,", "128)"]
    typed = list((venv / "lib").glob("python3*/site-packages/vss_client/py.typed"))
    assert typed, "py.typed is not installed"
