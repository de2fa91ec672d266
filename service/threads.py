"""How many threads a CLI command computes with, and pinning them (torch, OpenMP, OpenCV).

Unpinned, torch starts one OpenMP thread per core and OpenCV its own pool, on top of the pipeline's
decode, flow and writer threads: on a small machine they fight for the cores (issue 14 measured
480-580 ms/frame unpinned against 100-120 ms/frame with OMP_NUM_THREADS=1 on 2 cores). The CLI pins
them the way the server does with ``VSS_INTRA_OP_THREADS``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(env: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """``VSS_INTRA_OP_THREADS`` when set above 0 (the server's setting), else ``OMP_NUM_THREADS`` when set,
    else half the available CPUs (at least 1): the other half decodes, computes flow and writes."""
    env = os.environ if env is None else env
    for name in ("VSS_INTRA_OP_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, (cpus if cpus is not None else available_cpus()) // 2)


def pin_threads(n: int) -> None:
    """Use ``n`` compute threads: OpenMP/MKL environment (effective only before torch is imported),
    ``torch.set_num_threads`` and ``cv2.setNumThreads``."""
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    if "torch" not in sys.modules:
        for name in THREAD_ENV:
            os.environ[name] = str(n)
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)
