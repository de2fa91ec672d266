"""`vss models list|import PATH|activate VERSION|retire VERSION|unretire VERSION`: manage the model registry
(a directory or s3://bucket/prefix),
or a server's models. ``retire`` takes a per-domain version out of routing (service/routing.py) without
deleting it; ``unretire`` undoes that.

Running servers that share the registry pick up an activation within one poll interval. With
``--server URL`` the listing and the activation go through the server's API instead.

The registry is ``--model-dir``, else ``$VSS_MODEL_DIR``, else ``./var/models`` when it exists (where
`vss serve` / `make run` started in this directory keep their models), else the user data directory
``$XDG_DATA_HOME/vss/models`` (``~/.local/share/vss/models``). The output says which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli import CLIError

from .runtime import add_server_arguments

if TYPE_CHECKING:  # torch stays out of `vss --help`
    from service.registry_api import Registry

SERVER_DEFAULT = Path("var/models")  # `vss serve`'s default (service.settings.Settings.model_dir)
MODEL_DIR_HELP = ("registry directory or s3://bucket/prefix (default: $VSS_MODEL_DIR, else ./var/models if it "
                  "exists, else $XDG_DATA_HOME/vss/models, i.e. ~/.local/share/vss/models); S3 endpoint and "
                  "credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, import and activate model versions (here, or on a server with --server)",
                       description="Manage the model registry (v0001/, v0002/, ... and the ACTIVE pointer), or a "
                                   "server's models with --server.")
    p.add_argument("--model-dir", default=None, metavar="DIR", help=MODEL_DIR_HELP)
    add_server_arguments(p)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="list versions (* marks the active one)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    imp = actions.add_parser("import", help="copy a checkpoint directory in as the next version")
    imp.add_argument("path", type=Path, metavar="PATH", help="checkpoint directory (model.safetensors + meta.json)")
    imp.add_argument("--activate", action="store_true", help="also make it the active version")
    act = actions.add_parser("activate", help="make VERSION the active one (deploy or roll back)")
    act.add_argument("version", metavar="VERSION", help="e.g. v0002")
    ret = actions.add_parser("retire", help="stop routing streams and uploads to a per-domain VERSION")
    ret.add_argument("version", metavar="VERSION", help="e.g. v0003")
    unret = actions.add_parser("unretire", help="route to a retired per-domain VERSION again")
    unret.add_argument("version", metavar="VERSION", help="e.g. v0003")
    for parser in (ls, imp, act, ret, unret):  # also accept the global options after the action
        parser.add_argument("--model-dir", default=argparse.SUPPRESS, metavar="DIR", help=argparse.SUPPRESS)
        parser.add_argument("--server", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--api-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def default_model_dir(env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[Path | str, str]:
    """(registry directory or s3:// URL, why it was chosen) when no --model-dir is given."""
    env = dict(os.environ) if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    if env.get("VSS_MODEL_DIR"):
        value = env["VSS_MODEL_DIR"]
        return (value if "://" in value else Path(value)), "$VSS_MODEL_DIR"
    if (cwd / SERVER_DEFAULT).is_dir():
        return cwd / SERVER_DEFAULT, "./var/models, the server's default here"
    data_home = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return data_home / "vss" / "models", "the user data directory; set VSS_MODEL_DIR or --model-dir to change it"


def run(args: argparse.Namespace) -> int:
    if args.server is not None:
        if args.model_dir is not None:
            raise CLIError("give either --model-dir (a local registry) or --server URL, not both")
        from .remote import models

        return models(args)
    from models.checkpoint import CheckpointError, load_checkpoint
    from service.registry import RegistryError
    from service.registry_api import open_registry
    from service.settings import Settings
    from service.storage import StoreError

    location, why = (args.model_dir, "--model-dir") if args.model_dir is not None else default_model_dir()
    settings = Settings(model_dir=location)  # validates the location; the cache for a remote registry
    registry = open_registry(settings.model_dir, settings.cache_dir)
    try:
        if args.action == "list":
            return _list(registry, why, args.json)
        if args.action == "import":
            if not args.path.is_dir():
                raise CLIError(f"not a directory: {args.path}")
            with parent_as_version(registry, args.path) as (source, parent):
                version = registry.import_dir(source, activate=args.activate)
            print(f"imported {args.path} as {version} in {registry.location} ({why})"
                  + (f", parent {parent}" if parent else "") + (" (active)" if args.activate else ""))
            return 0
        if args.action in ("retire", "unretire"):
            registry.set_retired(args.version, args.action == "retire")
            what = ("retired: no stream or upload is routed to it" if args.action == "retire"
                    else "routable again if it has a domain")
            print(f"{args.version} is {what} in {registry.location}")
            return 0
        load_checkpoint(registry.path(args.version))  # never point ACTIVE at weights that do not load
        registry.activate(args.version)
        print(f"{args.version} is now active in {registry.location}")
        return 0
    except (RegistryError, CheckpointError, StoreError) as e:
        raise CLIError(str(e)) from e


@contextmanager
def parent_as_version(registry: Registry, source: Path) -> Iterator[tuple[Path, str | None]]:
    """The checkpoint to import, with its parent named by a registry version instead of a filesystem path.

    `vss adapt` records the parent's directory and its weights' sha256; when a version in this registry
    has those weights, the import gets a copy of ``source`` (files hard-linked where possible) whose
    ``meta.json`` names that version as ``parent`` (the path moves to ``provenance.parent_path``).
    Yields (directory to import, parent to report).
    """
    from models.checkpoint import META, read_meta
    from service.registry import InvalidVersion, validate_version

    meta = read_meta(source)
    parent = meta.get("parent")
    if parent is None:
        yield source, None
        return
    try:
        yield source, validate_version(str(parent))
        return
    except InvalidVersion:
        pass
    provenance = dict(meta.get("provenance") or {})
    wanted = provenance.get("parent_sha256") or _sha_of(Path(str(parent)), source)
    match = next((v for v in registry.versions() if wanted and _meta_sha(registry, v) == wanted), None)
    if match is None:
        yield source, str(parent)
        return
    staging = Path(tempfile.mkdtemp(prefix="vss-import-"))
    try:
        for item in source.iterdir():
            if item.is_file() and item.name != META:
                try:
                    os.link(item, staging / item.name)
                except OSError:  # another filesystem
                    shutil.copy2(item, staging / item.name)
        updated = {**meta, "parent": match, "provenance": {**provenance, "parent_path": str(parent)}}
        (staging / META).write_text(json.dumps(updated, indent=2))
        yield staging, match
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _meta_sha(registry: Registry, version: str) -> str | None:
    from models.checkpoint import CheckpointError

    try:
        return registry.meta(version).get("sha256")
    except CheckpointError:
        return None


def _sha_of(parent: Path, source: Path) -> str | None:
    """The weights sha256 in a parent checkpoint directory's meta.json (relative paths: from the child's)."""
    for candidate in (parent, source / parent):
        meta = candidate / "meta.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text()).get("sha256")
            except (OSError, ValueError):
                return None
    return None


def _list(registry: Registry, why: str, as_json: bool) -> int:
    from models.checkpoint import CheckpointError
    from service.registry import InvalidVersion

    from service.domains import domain_of

    try:
        active = registry.active()
    except InvalidVersion:
        active = None
    retired = registry.retired()
    rows: list[dict[str, Any]] = []
    for version in registry.versions():
        try:
            meta = registry.meta(version)
            row = {"version": version, "active": version == active, "parent": meta.get("parent"),
                   "created": (meta.get("provenance") or {}).get("created"),
                   "backbone": meta["architecture"].get("backbone"), "classes": len(meta["classes"]),
                   "input_size": meta["input_size"], "onnx": registry.has_onnx(version)}
            domain = domain_of(meta)
            row["domain"] = None if domain is None else {"name": domain.name, "clips": domain.clips}
            row["retired"] = version in retired
        except CheckpointError as e:
            row = {"version": version, "active": version == active, "error": str(e)}
        rows.append(row)
    if as_json:
        print(json.dumps({"root": registry.location, "chosen_by": why, "active": active, "versions": rows},
                         indent=2))
        return 0
    if not rows:
        print(f"no model versions in {registry.location} ({why})")
        return 0
    print(f"models in {registry.location} ({why})", file=sys.stderr)
    print_table(rows)
    return 0


def _domain_cell(row: dict[str, Any]) -> str:
    """``fog (12 clips)``, ``+ retired`` when it is out of routing; ``-`` without a domain."""
    domain = row.get("domain")
    text = "-" if not domain else f"{domain.get('name') or 'unnamed'} ({domain.get('clips', 0)} clips)"
    return text + (" retired" if row.get("retired") else "")


def print_table(rows: list[dict[str, Any]]) -> None:
    """Aligned columns, each as wide as its longest value; ``*`` marks the active version."""
    header = ("VERSION", "PARENT", "CREATED", "BACKBONE", "CLASSES", "INPUT", "ONNX", "DOMAIN")
    lines: list[tuple[str, ...]] = []
    errors: dict[int, str] = {}
    for i, r in enumerate(rows):
        if "error" in r:
            errors[i] = r["error"]
            lines.append((r["version"],))
            continue
        lines.append((r["version"], str(r.get("parent") or "-"), str(r.get("created") or "-"),
                      str(r.get("backbone") or "-"), str(r.get("classes", "-")),
                      "x".join(map(str, r.get("input_size") or [])) or "-", "yes" if r.get("onnx") else "no",
                      _domain_cell(r)))
    widths = [max([len(h)] + [len(line[c]) for line in lines if len(line) > c]) for c, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(cells)).rstrip()

    print("  " + fmt(header))
    for i, (r, line) in enumerate(zip(rows, lines)):
        mark = "* " if r["active"] else "  "
        print(mark + (f"{line[0].ljust(widths[0])}  unreadable: {errors[i]}" if i in errors else fmt(line)))
