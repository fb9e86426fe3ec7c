"""MobileNet (v1) for small images, as in kuangliu/pytorch-cifar: depthwise-separable blocks after a 3x3 stem."""

import torch
import torch.nn.functional as F
from torch import nn

from models.vision import export_example  # noqa: F401  (train/export.py reads it here)

CONFIG = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]
"""Output channels of each block at width 32, with its stride where it is not 1."""


class Block(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class MobileNet(nn.Module):
    """``width``: the stem's channels (32 in the paper); every block's channels scale with it."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, in_planes = [], width
        for item in CONFIG:
            planes, stride = item if isinstance(item, tuple) else (item, 1)
            planes = planes * width // 32
            blocks.append(Block(in_planes, planes, stride))
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(in_planes, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(self.layers(self.stem(x))))


ARCHITECTURES = {"MobileNet": MobileNet}
"""The constructors a manifest may name (``models.architecture``)."""
