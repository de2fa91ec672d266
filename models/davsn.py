"""Import DA-VSN / TPS released checkpoints (flat ``ResNetMulti`` + ``sf_layer`` state dicts).

Key layout of the release (see research notes §1.9): ``conv1``, ``bn1``, ``layer1``-``layer4`` (the
caffe-stride ResNet-101), ``layer5`` (aux ASPP on layer3), ``layer6`` (main ASPP), ``sf_layer``
(the 2C -> C fusion). Preprocessing: BGR, caffe mean subtraction, no std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .accel import AccelSegmenter, build_model
from .checkpoint import CheckpointError, load_state_strict, make_meta, save_checkpoint, sha256_file
from .classes import CLASS_SETS, palette_for
from .config import get_config

# Native DA-VSN evaluation input sizes (H, W): Cityscapes-Seq frames are resized to 512x1024.
DAVSN_INPUT_SIZE = (512, 1024)
PREFIXES = {"conv1": "net.backbone.conv1", "bn1": "net.backbone.bn1", "layer5": "net.aux_head",
            "layer6": "net.head", "sf_layer": "fusion.conv"}


def convert_davsn_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename DA-VSN keys to vss keys (``layer1``-``layer4`` go under ``net.backbone``)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        head, _, rest = key.partition(".")
        if head in PREFIXES:
            new = f"{PREFIXES[head]}.{rest}"
        elif head in ("layer1", "layer2", "layer3", "layer4"):
            new = f"net.backbone.{key}"
        else:
            raise CheckpointError(f"unexpected key {key!r}: not a DA-VSN/TPS ACCEL checkpoint")
        out[new] = value
    return out


def import_davsn(path: str | Path, classes: str, out_dir: str | Path) -> tuple[AccelSegmenter, dict[str, Any]]:
    """Convert a released ``.pth`` into a vss checkpoint directory. ``classes`` is viper or synthia."""
    path = Path(path)
    if classes not in ("viper", "synthia"):
        raise CheckpointError(f"--classes must be viper or synthia, got {classes!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/unsafe pickles
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint ({e})") from e
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    names = CLASS_SETS[classes]
    cfg = get_config("deeplabv2-r101", num_classes=len(names))
    n_file = raw.get("layer6.conv2d_list.0.bias")
    if n_file is not None and n_file.shape[0] != len(names):
        raise CheckpointError(f"{path}: has {n_file.shape[0]} classes, but --classes {classes} has {len(names)}")
    model = build_model(cfg)
    load_state_strict(model, convert_davsn_state(raw), str(path))
    meta = make_meta(cfg, list(names), palette_for(names), DAVSN_INPUT_SIZE, parent=None,
                     source="davsn-import", imported_from=path.name, imported_sha256=sha256_file(path))
    save_checkpoint(out_dir, model, meta)
    return model, meta
