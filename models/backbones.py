"""Dilated backbones for DeepLabV2: ResNets (torchvision key names, optional caffe strides) and MobileNetV3.

Every backbone returns ``{"aux": layer3-like features, "out": last features}`` at the configured
output stride and exposes ``aux_channels`` / ``out_channels``.
"""

from __future__ import annotations


import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, caffe_stride: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, caffe_stride: bool = False) -> None:
        super().__init__()
        # Caffe-style ResNets (DeepLab / DA-VSN weights) stride in the first 1x1 conv.
        s1, s2 = (stride, 1) if caffe_stride else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s2, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet-mini": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class Backbone(nn.Module):
    """What the DeepLab heads need of a backbone: ``forward`` returns ``{"out": ..., "aux": ...}``
    features with these channel counts."""

    out_channels: int
    aux_channels: int


class ResNet(Backbone):
    """ResNet trunk with layer3/layer4 strides replaced by dilation to reach output stride 8 or 16."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], output_stride: int = 8,
                 width: int = 64, caffe_stride: bool = False) -> None:
        super().__init__()
        self.caffe_stride = caffe_stride
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=caffe_stride)
        s3, d3, s4, d4 = (1, 2, 1, 4) if output_stride == 8 else (2, 1, 1, 2)
        self.layer1 = self._make_layer(block, width, layers[0], 1, 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, 1)
        self.layer3 = self._make_layer(block, width * 4, layers[2], s3, d3)
        self.aux_channels = self.inplanes
        self.layer4 = self._make_layer(block, width * 8, layers[3], s4, d4)
        self.out_channels = self.inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int,
                    dilation: int) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion or dilation > 1:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        mods = [block(self.inplanes, planes, stride, dilation, downsample, self.caffe_stride)]
        self.inplanes = planes * expansion
        mods += [block(self.inplanes, planes, 1, dilation, None, self.caffe_stride) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        aux = self.layer3(x)
        return {"aux": aux, "out": self.layer4(aux)}


class MobileNetV3Backbone(Backbone):
    """torchvision MobileNetV3-Large features, strides after the target output stride turned into dilation."""

    AUX_INDEX = 12  # last block at stride 16 in the undilated net (112 channels)

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_large

        self.features = mobilenet_v3_large(weights=None).features
        _dilate_after_stride(self.features, output_stride)
        self.aux_channels = self.features[self.AUX_INDEX].out_channels
        self.out_channels = self.features[-1].out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        aux = self.features[: self.AUX_INDEX + 1](x)
        return {"aux": aux, "out": self.features[self.AUX_INDEX + 1:](aux)}


def _dilate_after_stride(features: nn.Module, output_stride: int) -> None:
    """Walk convs in forward order; once the running stride hits ``output_stride``, trade strides for dilation."""
    stride, dilation = 1, 1
    for m in features.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        k = m.kernel_size[0]
        if m.stride[0] == 2:
            if stride >= output_stride:
                m.stride = (1, 1)
                dilation *= 2
            else:
                stride *= 2
        if k > 1 and dilation > 1:
            m.dilation = (dilation, dilation)
            m.padding = (dilation * (k - 1) // 2,) * 2


def build_backbone(name: str, output_stride: int, width: int = 64, caffe_stride: bool = False) -> Backbone:
    """Backbone by name (see ``RESNET_LAYOUTS`` and ``mobilenet_v3_large``)."""
    if name == "mobilenet_v3_large":
        return MobileNetV3Backbone(output_stride)
    if name not in RESNET_LAYOUTS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted([*RESNET_LAYOUTS, 'mobilenet_v3_large'])}")
    block, layers = RESNET_LAYOUTS[name]
    return ResNet(block, layers, output_stride, width, caffe_stride)
