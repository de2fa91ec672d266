"""Model configurations: one frozen dataclass, named presets, preprocessing conventions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# The bundled demo checkpoint (``python -m adaptation.make_demo -o service/demo_model``, config ``mini-os8``):
# the one place that names it for the service settings, the CLI, the benchmarks and the tests. Here, not in
# ``checkpoint``, so that torch-free code (settings, argument parsers) can name it.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "service" / "demo_model"

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
# DA-VSN / ADVENT / AdaptSegNet: BGR order, caffe mean subtraction, no std division.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


@dataclass(frozen=True)
class Normalization:
    """How raw 0..255 RGB frames are turned into network input: reorder, subtract mean, divide std."""

    channel_order: str = "RGB"  # "RGB" or "BGR": the order the network expects
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB  # in the network's channel order, 0..255 scale
    std: tuple[float, float, float] = IMAGENET_STD_RGB

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")


CAFFE_BGR = Normalization("BGR", CAFFE_MEAN_BGR, (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the per-frame DeepLabV2 network; the ACCEL fusion is always added on top."""

    backbone: str = "resnet101"  # resnet18 | resnet50 | resnet101 | resnet-mini | mobilenet_v3_large
    num_classes: int = 19
    output_stride: int = 8  # 8 or 16
    aspp_rates: tuple[int, ...] = (6, 12, 18, 24)
    aux_head: bool = True  # DeepLabV2 aux classifier on layer3 ("layer5" in DA-VSN)
    caffe_stride: bool = False  # stride in the first 1x1 conv of a bottleneck, ceil-mode maxpool
    width: int = 64  # stem width of the ResNets (64 = standard; resnet-mini uses less)
    normalization: Normalization = field(default_factory=Normalization)

    def __post_init__(self) -> None:
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
        if self.num_classes < 1:
            raise ValueError("num_classes must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        norm = data.pop("normalization", None) or {}
        norm = Normalization(
            channel_order=norm.get("channel_order", "RGB"),
            mean=tuple(norm.get("mean", IMAGENET_MEAN_RGB)),
            std=tuple(norm.get("std", IMAGENET_STD_RGB)),
        )
        known = {f for f in cls.__dataclass_fields__ if f != "normalization"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        if "aspp_rates" in data:
            data["aspp_rates"] = tuple(data["aspp_rates"])
        return cls(**data, normalization=norm)


# Named presets. "deeplabv2-r101" is the paper configuration (DA-VSN / TPS weights load into it).
CONFIGS: dict[str, ModelConfig] = {
    "deeplabv2-r101": ModelConfig("resnet101", 19, 8, (6, 12, 18, 24), True, True, 64, CAFFE_BGR),
    "deeplabv2-r50": ModelConfig("resnet50", 19, 8),
    "r18-os8": ModelConfig("resnet18", 19, 8),
    "r18-os16": ModelConfig("resnet18", 19, 16, (3, 6, 9, 12)),
    "mnv3-os16": ModelConfig("mobilenet_v3_large", 19, 16, (3, 6, 9, 12)),
    "mnv3-os8": ModelConfig("mobilenet_v3_large", 19, 8),
    # The bundled demo model: a narrow ResNet-10-shaped net (one block per stage), 0.3 M params, fast on CPU.
    "mini-os8": ModelConfig("resnet-mini", 7, 8, (3, 6, 9, 12), True, False, 16),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Return a named preset, optionally with fields replaced (e.g. num_classes=15)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


def parse_hxw(text: str, min_side: int = 1, max_side: int | None = None) -> tuple[int, int]:
    """``"256x512"`` (case-insensitive) -> (256, 512); ValueError naming the expected form or range.

    The one parser of HxW sizes; CLI flags and query parameters wrap it in their own error type.
    """
    h, sep, w = text.strip().lower().partition("x")
    if not (sep and all(side.isascii() and side.isdigit() and len(side) <= 6 for side in (h, w))):
        raise ValueError(f"expected HxW such as 256x512, got {text!r}")
    size = (int(h), int(w))
    if min(size) < min_side or (max_side is not None and max(size) > max_side):
        bounds = f"{min_side}..{max_side}" if max_side is not None else f">= {min_side}"
        raise ValueError(f"size {size[0]}x{size[1]} out of range ({bounds} per side)")
    return size
