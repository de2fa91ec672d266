"""ONNX export of the two halves of the ACCEL model.

Two graphs, both with dynamic batch and spatial sizes:

* ``model.onnx`` — the per-frame network: ``frames`` (N, 3, H, W) float32 RGB 0..255 (normalisation
  is inside the graph) -> ``logits`` (N, C, H/s, W/s), the main head only.
* ``fusion.onnx`` — the fusion step: ``current`` and ``previous`` logits (N, C, h, w) and ``flow``
  (N, 2, H, W), a backward t->t-1 flow in pixels of the input grid -> ``fused`` (N, C, h, w).
  The flow resize and the bilinear ``GridSample`` warp are inside the graph and follow
  ``models.warp.warp`` term by term (align-corners resize with per-axis vector scaling, border
  padding). Doing the warp in the graph keeps it bit-for-bit the same math as torch, which an
  OpenCV ``remap`` (fixed-point 1/32 px weights, half-pixel resize) would not; at logit resolution
  it costs well under a millisecond either way.

Exporter: both torch exporters give correct dynamic N/H/W graphs with the same outputs (max relative
difference to torch ~1e-6). The TorchScript ("legacy") one is the default because it takes 0.2-0.7 s
per graph on two loaded CPU cores against 10-20 s for the dynamo exporter, and servers export on
demand when a version without graphs is activated. It is deprecated upstream: ``exporter="dynamo"``
(onnxscript) is supported and tested, and becomes the default when torch drops the legacy path.

A manifest ``onnx.json`` records the sha256 of the weights the graphs came from, so a registry
version whose weights changed (or whose export is from an older exporter) is re-exported.
Files are written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accel import AccelSegmenter, ScoreFusion
from .atomic import replacing, write_atomic
from .checkpoint import load_checkpoint

FRAME_FILE = "model.onnx"
FUSION_FILE = "fusion.onnx"
MANIFEST_FILE = "onnx.json"
EXPORT_FORMAT = "vss-onnx/1"
DEFAULT_OPSET = 18
LEGACY_MAX_OPSET = 17  # the TorchScript exporter is tested up to opset 17
EXPORTERS = ("dynamo", "legacy")
# Range of the dynamic spatial axes (an input of 16 px has 2 logits at stride 8).
MIN_INPUT = 16
MAX_DIM = 8192


class ExportError(RuntimeError):
    """The ONNX export failed or its output does not match torch."""


class FrameGraph(nn.Module):
    """The per-frame network with only the main logits as output (what ``Engine.frame_logits`` returns)."""

    def __init__(self, model: AccelSegmenter) -> None:
        super().__init__()
        self.net = model.net

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)["main"]


class FusionGraph(nn.Module):
    """Flow resize + backward warp + 1x1 score fusion, written with export-friendly ops.

    Same arithmetic as ``models.warp.resize_flow`` / ``flow_to_grid`` / ``warp`` followed by
    ``ScoreFusion``; the only difference is that the resize is never skipped (an align-corners
    resize to the same size is the identity), because a shape-dependent branch cannot be exported.
    """

    def __init__(self, fusion: ScoreFusion) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, current: torch.Tensor, previous: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        h, w = current.shape[-2], current.shape[-1]
        h0, w0 = flow.shape[-2], flow.shape[-1]
        resized = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=True)
        dx = resized[:, 0] * ((w - 1) / (w0 - 1))
        dy = resized[:, 1] * ((h - 1) / (h0 - 1))
        xs = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
        ys = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
        gx = 2.0 * (xs + dx) / (w - 1) - 1.0
        gy = 2.0 * (ys + dy) / (h - 1) - 1.0
        grid = torch.stack((gx, gy), dim=-1)
        warped = F.grid_sample(previous, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return self.fusion(current, warped)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, names: tuple[list[str], list[str]],
            dims: dict[str, dict[int, str]], exporter: str, opset: int) -> None:
    """Export one graph into a single self-contained file (no external data), written atomically.

    ``dims`` names the dynamic axes of every input and output, e.g. ``{"frames": {0: "N", 2: "H"}}``.
    """
    input_names, output_names = names
    try:
        with replacing(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
            if exporter == "dynamo":
                torch.onnx.export(module, args, tmp, input_names=input_names, output_names=output_names,
                                  dynamic_shapes=_dynamo_shapes(input_names, dims), opset_version=opset,
                                  dynamo=True, external_data=False, optimize=True, verbose=False)
            else:
                torch.onnx.export(module, args, tmp, input_names=input_names, output_names=output_names,
                                  dynamic_axes=dims, opset_version=min(opset, LEGACY_MAX_OPSET), dynamo=False)
    except Exception as e:
        raise ExportError(f"ONNX export ({exporter}) to {path} failed: {type(e).__name__}: {e}") from e


def _dynamo_shapes(input_names: list[str], dims: dict[str, dict[int, str]]) -> dict[str, dict[int, Any]]:
    """``torch.export`` dimension objects for the named dynamic axes of the inputs."""
    from torch.export import Dim

    lower = {"N": 1, "H": MIN_INPUT, "W": MIN_INPUT, "h": 2, "w": 2}
    made: dict[str, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for name in input_names:
        out[name] = {}
        for axis, dim in dims[name].items():
            if dim not in made:
                made[dim] = Dim(dim, min=lower[dim], max=MAX_DIM)
            out[name][axis] = made[dim]
    return out


def export_onnx(model: AccelSegmenter, out_dir: str | Path, input_size: tuple[int, int] = (256, 512),
                weights_sha256: str | None = None, exporter: str = "legacy",
                opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export ``model.onnx`` and ``fusion.onnx`` (+ ``onnx.json``) into ``out_dir``; returns the manifest.

    ``input_size`` (H, W) is only the example shape used for tracing; both graphs accept any batch
    size and any spatial size of at least ``MIN_INPUT`` pixels. ``exporter`` is ``"legacy"``
    (TorchScript, < 1 s) or ``"dynamo"`` (onnxscript, 10-40 s here); see the module docstring.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose one of {EXPORTERS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval().float().cpu()  # never move or retype the caller's module
    h, w = int(input_size[0]), int(input_size[1])
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        frames = torch.rand(2, 3, h, w, generator=gen) * 255.0
        logits = FrameGraph(model)(frames)
    flow = torch.randn(2, 2, h, w, generator=gen) * 3.0
    big, small = {0: "N", 2: "H", 3: "W"}, {0: "N", 2: "h", 3: "w"}
    _export(FrameGraph(model), (frames,), out_dir / FRAME_FILE, (["frames"], ["logits"]),
            {"frames": big, "logits": small}, exporter, opset)
    _export(FusionGraph(model.fusion), (logits, logits.roll(1, dims=-1), flow), out_dir / FUSION_FILE,
            (["current", "previous", "flow"], ["fused"]),
            {"current": small, "previous": small, "flow": big, "fused": small}, exporter, opset)

    manifest = {
        "format": EXPORT_FORMAT,
        "weights_sha256": weights_sha256,
        "frame": FRAME_FILE,
        "fusion": FUSION_FILE,
        "opset": opset,
        "exporter": exporter,
        "num_classes": model.num_classes,
        "output_stride": h // int(logits.shape[-2]),
        "traced_input_size": [h, w],
        "torch": torch.__version__,
        "export_seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The ``onnx.json`` manifest of a directory, or None if absent or unreadable."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        return None
    return manifest


def is_current(directory: str | Path, weights_sha256: str | None) -> bool:
    """True if ``directory`` holds both graphs exported from weights with this sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    return (manifest is not None and manifest.get("weights_sha256") == weights_sha256
            and (directory / FRAME_FILE).is_file() and (directory / FUSION_FILE).is_file())


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path | None = None,
                      exporter: str = "legacy", opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Load a checkpoint directory and export it (by default into the checkpoint directory itself)."""
    model, meta = load_checkpoint(checkpoint_dir)
    target = Path(out_dir) if out_dir is not None else Path(checkpoint_dir)
    return export_onnx(model, target, tuple(meta["input_size"]), meta.get("sha256"), exporter, opset)
