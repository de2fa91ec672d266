"""`vss models list|import PATH|activate VERSION`: manage the model registry (a directory or s3://bucket/prefix).

Running servers that share the registry pick up an activation within one poll interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli import CLIError

if TYPE_CHECKING:  # torch stays out of `vss --help`
    from service.registry_api import Registry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, import and activate model versions",
                       description="Manage the model registry (v0001/, v0002/, ... and the ACTIVE pointer).")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="registry directory or s3://bucket/prefix (default: $VSS_MODEL_DIR or var/models); "
                        "S3 endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="list versions (* marks the active one)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    imp = actions.add_parser("import", help="copy a checkpoint directory in as the next version")
    imp.add_argument("path", type=Path, metavar="PATH", help="checkpoint directory (model.safetensors + meta.json)")
    imp.add_argument("--activate", action="store_true", help="also make it the active version")
    act = actions.add_parser("activate", help="make VERSION the active one (deploy or roll back)")
    act.add_argument("version", metavar="VERSION", help="e.g. v0002")
    for parser in (ls, imp, act):  # also accept --model-dir after the action
        parser.add_argument("--model-dir", default=argparse.SUPPRESS, metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.checkpoint import CheckpointError, load_checkpoint
    from service.registry import RegistryError
    from service.registry_api import open_registry
    from service.settings import Settings
    from service.storage import StoreError

    settings = Settings() if args.model_dir is None else Settings(model_dir=args.model_dir)
    registry = open_registry(settings.model_dir, settings.cache_dir)
    try:
        if args.action == "list":
            return _list(registry, args.json)
        if args.action == "import":
            if not args.path.is_dir():
                raise CLIError(f"not a directory: {args.path}")
            version = registry.import_dir(args.path, activate=args.activate)
            print(f"imported {args.path} as {version}" + (" (active)" if args.activate else ""))
            return 0
        load_checkpoint(registry.path(args.version))  # never point ACTIVE at weights that do not load
        registry.activate(args.version)
        print(f"{args.version} is now active in {registry.location}")
        return 0
    except (RegistryError, CheckpointError, StoreError) as e:
        raise CLIError(str(e)) from e


def _list(registry: Registry, as_json: bool) -> int:
    from models.checkpoint import CheckpointError
    from service.registry import InvalidVersion

    try:
        active = registry.active()
    except InvalidVersion:
        active = None
    rows = []
    for version in registry.versions():
        try:
            meta = registry.meta(version)
            row = {"version": version, "active": version == active, "parent": meta.get("parent"),
                   "created": (meta.get("provenance") or {}).get("created"),
                   "backbone": meta["architecture"].get("backbone"), "classes": len(meta["classes"]),
                   "input_size": meta["input_size"], "onnx": registry.has_onnx(version)}
        except CheckpointError as e:
            row = {"version": version, "active": version == active, "error": str(e)}
        rows.append(row)
    if as_json:
        print(json.dumps({"root": registry.location, "active": active, "versions": rows}, indent=2))
        return 0
    if not rows:
        print(f"no model versions in {registry.location}")
        return 0
    print(f"{'':2}{'VERSION':<9}{'PARENT':<9}{'CREATED':<22}{'BACKBONE':<14}{'CLASSES':<9}{'INPUT':<10}ONNX")
    for r in rows:
        mark = "* " if r["active"] else "  "
        if "error" in r:
            print(f"{mark}{r['version']:<9}unreadable: {r['error']}")
            continue
        size = "x".join(map(str, r["input_size"]))
        print(f"{mark}{r['version']:<9}{r['parent'] or '-':<9}{r['created'] or '-':<22}{r['backbone']:<14}"
              f"{r['classes']:<9}{size:<10}{'yes' if r['onnx'] else 'no'}")
    return 0
