"""Options shared by the compute commands: ``--threads``, ``--no-progress``, and ``--server``/``--api-key``."""

from __future__ import annotations

import argparse
import sys


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="compute threads (torch, OpenMP, OpenCV); default: $VSS_INTRA_OP_THREADS, else "
                             "$OMP_NUM_THREADS, else half the CPUs")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal)")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, metavar="URL",
                        help="run on this vss server (e.g. http://127.0.0.1:8000) instead of here; needs "
                             "the vss-client package (pip install ./client)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="bearer token for --server's mutating routes (default: $VSS_API_KEY)")


def show_progress(disabled: bool) -> bool:
    """A progress bar only when stderr is a terminal and it was not turned off (``--no-progress``)."""
    return not disabled and sys.stderr.isatty()


def apply_threads(args: argparse.Namespace) -> int:
    """Pin the compute threads for a local run; returns the number used."""
    from service.cli import CLIError
    from service.threads import default_threads, pin_threads

    n = args.threads if args.threads is not None else default_threads()
    if n < 1:
        raise CLIError(f"--threads must be >= 1, got {n}")
    pin_threads(n)
    return n
