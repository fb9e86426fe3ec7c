"""VGG with batch normalisation, as in kuangliu/pytorch-cifar: 3x3 conv stacks between max-pools, one linear layer.

Pools use ``ceil_mode`` and a global average pool ends the features, so 28x28 inputs work as well as 32x32 ones.
"""

import torch
from torch import nn

from models.vision import export_example  # noqa: F401  (train/export.py reads it here)

CONFIGS = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``config``: output channels of each conv (divided by ``64 // width``) or "M" for a 2x2 max-pool."""

    def __init__(self, config: str, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        layers, channels = [], in_channels
        for item in CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            planes = item * width // 64
            layers += [nn.Conv2d(channels, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()]
            channels = planes
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return next(m for m in reversed(self.features) if isinstance(m, nn.ReLU))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def VGG11(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> VGG:
    return VGG("VGG11", in_channels, num_classes, width)


def VGG16(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> VGG:
    return VGG("VGG16", in_channels, num_classes, width)


ARCHITECTURES = {"VGG11": VGG11, "VGG16": VGG16}
"""The constructors a manifest may name (``models.architecture``)."""
