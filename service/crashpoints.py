"""Named points where a test can freeze a process to kill it there (kill -9 / SIGTERM crash tests).

``reached("upload_job_start")`` does nothing unless the environment names that point in
``VSS_CRASHPOINT``; then it writes this process's pid to ``VSS_CRASHPOINT_FILE`` (if set) and waits
there until the process is killed, or, when ``VSS_CRASHPOINT_RELEASE`` names a file, until that file
exists (a test changes the world, e.g. fills the disk, then lets the process go on). Production never
sets the variable; the call costs one dict lookup.

Points: ``upload_job_start`` (an upload job was accepted, before it segments), ``segment_frame``
(after the first frame of a segmentation), ``result_write`` (the result file is complete, before it
is renamed into place), ``adapt_running`` (the worker trains a job), ``publish_staged`` (a candidate
version is written to its staging directory, before the rename that publishes it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV, FILE_ENV, RELEASE_ENV = "VSS_CRASHPOINT", "VSS_CRASHPOINT_FILE", "VSS_CRASHPOINT_RELEASE"


def reached(name: str) -> None:
    """Freeze here (until killed, or released) when ``VSS_CRASHPOINT`` names this point."""
    if os.environ.get(ENV) != name:
        return
    marker, release = os.environ.get(FILE_ENV), os.environ.get(RELEASE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n")
    while not (release and Path(release).exists()):  # a signal handler may raise here (the CLI's SIGTERM)
        time.sleep(0.05)
