"""`vss` command line. Each sub-command lives in ``service/commands/<name>.py`` with ``register(sub)``.

Errors that users can cause (bad arguments, unreadable videos, bad checkpoints) are printed as one
line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import NoReturn

# Explicit list of command modules, in help order.
COMMANDS: tuple[str, ...] = (
    "segment", "eval", "demo", "synth", "import_davsn", "serve", "models", "export_onnx", "adapt",
    "train", "worker",
)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vss", description="Video semantic segmentation that adapts itself.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"service.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
