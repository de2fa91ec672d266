"""`vss` command line. Each sub-command lives in ``service/commands/<name>.py`` with ``register(sub)``.

Errors that users can cause (bad arguments, unreadable videos, bad checkpoints) are printed as one
line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Explicit list of command modules, in help order.
COMMANDS: tuple[str, ...] = (
)


class CLIError(Exception):
    """A user-facing error: printed as ``vss: error: <message>`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vss", description="Video semantic segmentation that adapts itself.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"service.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("vss: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"vss: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
