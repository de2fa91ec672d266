"""`vss` command line. Each sub-command lives in ``service/commands/<module>.py`` with ``register(sub)``.

Errors that users can cause (bad arguments, unreadable videos, bad checkpoints) are printed as one
line on stderr with a non-zero exit status, never as a traceback.

Only the module of the command being run is imported (``vss --help`` and ``vss --version`` import
none, and no command module imports torch at import time), so help answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

# command -> (module in service/commands, one-line help shown by `vss --help`), in help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("segment", "segment a video file (here, or on a server with --server)"),
    "eval": ("eval", "score a checkpoint on a labelled clip (mIoU, temporal consistency)"),
    "demo": ("demo", "segment a generated target-style clip with the bundled model"),
    "synth": ("synth", "render a synthetic labelled clip"),
    "import-davsn": ("import_davsn", "convert a DA-VSN / TPS .pth checkpoint"),
    "serve": ("serve", "run the segmentation server"),
    "models": ("models", "list, import and activate model versions (here, or on a server with --server)"),
    "export-onnx": ("export_onnx", "export a checkpoint to ONNX (per-frame network + fusion step)"),
    "adapt": ("adapt", "adapt a model to unlabeled target videos (source-free) and gate it, here or on a server"),
    "train": ("train", "offline domain adaptation / supervised training on datasets"),
    "worker": ("worker", "run the adaptation worker (for servers started with VSS_WORKER=external)"),
}


def version() -> str:
    """The installed distribution's version (``0+unknown`` when running from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vss")
    except PackageNotFoundError:
        return "0+unknown"


class CLIError(Exception):
    """A user-facing error: printed as ``vss: error: <message>`` with exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that the same cleanup runs (no partial output)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (sub-command parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` (if any) has its module imported and registered."""
    parser = _Parser(prog="vss", description="Video semantic segmentation that adapts itself.",
                     epilog="`vss COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"vss {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in (argv or ()) if not a.startswith("-")), None)
    for name, (module, summary) in COMMANDS.items():
        if name == wanted:
            importlib.import_module(f"service.commands.{module}").register(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    # Every file command cleans up on SIGTERM as on Ctrl-C; `vss serve` and `vss worker` keep the default
    # (terminate at once) until they install their own handlers (uvicorn's graceful shutdown, the worker's).
    own_handlers = args.command in ("serve", "worker") or threading.current_thread() is not threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if own_handlers else signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("vss: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("vss: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"vss: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not own_handlers:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    # `python -m service.cli`: run the package module's main, so that the CLIError class the commands
    # import (service.cli.CLIError) is the one caught, not a copy defined in __main__.
    from service.cli import main as _main

    sys.exit(_main())
