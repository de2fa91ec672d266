"""A small kustomize renderer for the subset deploy/k8s uses, so the manifests can be checked on a
machine without kubectl or kustomize (where `kubectl kustomize` exists, the tests compare the two).

Supported kustomization keys: ``resources`` (files or directories with a kustomization),
``images`` (``name`` with ``newName`` / ``newTag`` / ``digest``) and ``patches`` (``path`` to a
strategic-merge patch that names its target by apiVersion, kind and metadata.name). Anything else
is refused, so a new feature in the manifests cannot be silently ignored here.

Strategic merge, as far as these manifests need it: maps merge key by key (``null`` deletes), lists
whose items all have a ``name`` merge item by item on it (containers, env, volumes, volumeMounts),
any other list is replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}
Object = dict[str, Any]


class KustomizeError(ValueError):
    pass


def key(obj: Object) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def load_documents(path: Path) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[Object]:
    """The objects ``kustomize build directory`` would print (in file order)."""
    kustomization = directory / "kustomization.yaml"
    if not kustomization.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    spec = yaml.safe_load(kustomization.read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kustomization}: unsupported keys {sorted(unknown)}")
    objects: list[Object] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        objects += render(target) if target.is_dir() else load_documents(target)
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        if key(obj) in seen:
            raise KustomizeError(f"{directory}: {key(obj)} is defined twice")
        seen.add(key(obj))
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{kustomization}: only `patches: - path: FILE` is supported")
        for patch in load_documents(directory / patch_entry["path"]):
            objects = apply_patch(objects, patch)
    for image in spec.get("images", []):
        objects = [set_image(obj, image) for obj in objects]
    return objects


def apply_patch(objects: list[Object], patch: Object) -> list[Object]:
    matches = [i for i, obj in enumerate(objects)
               if key(obj) == key(patch) and obj["apiVersion"] == patch["apiVersion"]]
    if len(matches) != 1:
        raise KustomizeError(f"patch target {patch['apiVersion']} {key(patch)} matches {len(matches)} objects")
    result = list(objects)
    result[matches[0]] = merge(objects[matches[0]], patch)
    return result


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge of ``patch`` onto ``base`` (new objects; the inputs are not changed)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def set_image(obj: Object, image: dict[str, str]) -> Object:
    """kustomize's ``images`` transformer on every container and init container of a pod template."""
    if obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj
    out = copy.deepcopy(obj)
    pod = out["spec"]["template"]["spec"]
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, tag, digest = split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        else:
            new_tag = image.get("newTag", tag)
            container["image"] = f"{name}:{new_tag}" if new_tag else (f"{name}@{digest}" if digest else name)
    return out


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/repo/name:tag@digest`` → (name, tag, digest); a port is not a tag."""
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:], digest or None
    return name, None, digest or None
