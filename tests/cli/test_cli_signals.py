"""`vss segment` stopped by SIGTERM (a container stop, systemd) leaves no partial output (issue 10, defect 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
VSS = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.mark.parametrize("sig, status, said", [(signal.SIGTERM, 143, "vss: terminated"),
                                               (signal.SIGINT, 130, "vss: interrupted")])
def test_a_signal_mid_segmentation_leaves_no_partial_output(sig: signal.Signals, status: int, said: str,
                                                            tmp_path: Path, tiny_checkpoint: Path,
                                                            synthetic_video) -> None:
    out, marker = tmp_path / "out" / "out.zip", tmp_path / "reached"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "VSS_CRASHPOINT": "segment_frame", "VSS_CRASHPOINT_FILE": str(marker)}
    proc = subprocess.Popen([*VSS, "segment", str(synthetic_video.path), "-o", str(out), "--checkpoint",
                             str(tiny_checkpoint), "--flow", "none"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, 120, "the first segmented frame")
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert [p.name for p in out.parent.iterdir() if p.name.endswith(".part")], "the sink writes a temp file"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr.decode()[-2000:]
    assert stderr.decode().strip().splitlines()[-1] == said
    assert list(out.parent.iterdir()) == [], "partial output left behind"
