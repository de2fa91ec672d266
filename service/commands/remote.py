"""`vss segment|adapt|models ... --server URL`: the same commands against a running server, through vss_client.

The client is the separate ``vss-client`` distribution in ``client/`` (no torch). In a checkout that
did not install it, the checkout's copy is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from service.cli import CLIError

CHECKOUT_CLIENT = Path(__file__).resolve().parents[2] / "client"


def import_client() -> ModuleType:
    """``vss_client``, installed or from this checkout's ``client/``; a clear error when neither exists."""
    try:
        import vss_client
    except ImportError:
        if not (CHECKOUT_CLIENT / "vss_client" / "__init__.py").is_file():
            raise CLIError("--server needs the vss-client package: pip install ./client (from the vss "
                           "repository)") from None
        sys.path.append(str(CHECKOUT_CLIENT))
        import vss_client
    return vss_client


@contextmanager
def connect(args: argparse.Namespace) -> Iterator[Any]:
    """A ``vss_client.Client`` for ``--server``; its errors become one-line CLI errors."""
    vc = import_client()
    try:
        client = vc.Client(args.server, api_key=args.api_key)
    except ValueError as e:
        raise CLIError(f"--server: {e}") from e
    try:
        yield client
    except vc.VSSError as e:
        raise CLIError(f"{args.server}: {e}") from e
    finally:
        client.close()


@contextmanager
def bar(enabled: bool, label: str, unit: str) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    with import_client().tqdm_progress(label, unit, leave=True) as update:
        yield update


def segment(args: argparse.Namespace, fmt: str, show: bool) -> int:
    local_only = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--raft-weights", args.raft_weights),
                                           ("--threads", args.threads)) if value is not None]
    if local_only:
        raise CLIError(f"{', '.join(local_only)} apply to local runs; the server uses its active model and settings")
    with connect(args) as client, bar(show, "segment", "frame") as progress:
        result = client.segment(args.video, format=fmt, output=args.output, stride=args.stride,
                                max_frames=args.max_frames, progress=progress)
    print(json.dumps({"frames": result.frames, "format": fmt, "model_version": result.model_version,
                      "output": str(args.output), "server": client.url,
                      "job": result.job["id"] if result.job else None}))
    return 0


def models(args: argparse.Namespace) -> int:
    if args.action == "import":
        raise CLIError("models import copies a local checkpoint directory into a registry: run it where the "
                       "model directory is (--model-dir), then `vss models activate VERSION --server URL`")
    with connect(args) as client:
        if args.action == "activate":
            serving = client.models.activate(args.version)
            print(f"{serving['version']} is now active on {client.url}")
            return 0
        if args.action in ("retire", "unretire"):
            info = client.models.retire(args.version, args.action == "retire")
            print(f"{info['version']} is {'retired' if info['retired'] else 'not retired'} on {client.url}")
            return 0
        listing = client.models.listing()
    if args.json:
        print(json.dumps({"server": client.url, **listing}, indent=2))
        return 0
    from .models import print_table

    print(f"models on {client.url}", file=sys.stderr)
    print_table([{"version": v["version"], "active": v["active"], "parent": v.get("parent"),
                  "created": v.get("created"), "backbone": (v.get("architecture") or {}).get("backbone"),
                  "classes": len(v.get("classes") or []), "input_size": v.get("input_size") or [],
                  "onnx": v.get("has_onnx"), "domain": v.get("domain"), "retired": v.get("retired"),
                  **({"error": v["error"]} if v.get("error") else {})}
                 for v in listing["versions"]])
    return 0


def adapt(args: argparse.Namespace, show: bool) -> int:
    local_only = [flag for flag, value in (("--checkpoint", args.checkpoint), ("-o/--out", args.out),
                                           ("--val-video", args.val_video), ("--crop", args.crop),
                                           ("--threads", args.threads)) if value is not None]
    if local_only:
        raise CLIError(f"{', '.join(local_only)} apply to local runs; on a server the job adapts the active "
                       "model to its clip buffer and publishes the new version itself")
    from .adapt import parse_options

    if args.labeled_frames:
        raise CLIError("--labeled-frames applies to local runs; a server trains on its VSS_VAL_DIR clips with "
                       "POST /v1/adapt {\"labeled_frames\": K}")
    with connect(args) as client:
        for video in args.video or []:
            if not Path(video).is_file():
                raise CLIError(f"video not found: {video}")
            added = client.add_clips(video, stride=args.stride, max_frames=min(args.max_frames, 2048))
            if not args.quiet:
                print(f"{video}: {len(added['added'])} clips added to the server's buffer", file=sys.stderr)
        with bar(show, f"adapt {args.method}", "step") as progress:
            job = client.adapt(args.method, steps=args.steps, lr=args.lr, time_budget_s=args.time_budget,
                               batch_size=args.batch_size, seed=args.seed, options=parse_options(args.option),
                               progress=progress)
    print(json.dumps({k: job.get(k) for k in ("id", "state", "method", "parent", "version", "activated", "gate")}
                     | {"method": args.method, "server": client.url}))
    if job["state"] == "rejected":
        from .adapt import EXIT_REJECTED

        reasons = (job.get("gate") or {}).get("reasons") or []
        print("vss: adapt: the server's gate rejected the candidate, nothing published:", file=sys.stderr)
        for reason in reasons:
            print(f"  - {reason}", file=sys.stderr)
        return EXIT_REJECTED
    return 0
