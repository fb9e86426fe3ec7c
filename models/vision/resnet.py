"""CIFAR-style ResNets: a 3x3 stem without max-pooling, BasicBlock stages that halve the resolution after the first.

``ResNet18`` is kuangliu/pytorch-cifar's (4 stages of 2 blocks, width 64: 11M parameters, the GPU choice);
``ResNetSmall`` is three stages of one block at width 16 (~80k parameters), the CPU default for 28x28 images.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.vision import export_example  # noqa: F401  (train/export.py reads it here)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, ``len(blocks)`` stages of BasicBlocks (width doubling per stage), global average pool, linear."""

    def __init__(self, blocks: list[int], in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, in_planes = [], width
        for index, count in enumerate(blocks):
            planes = width * 2**index
            strides = [1 if index == 0 else 2] + [1] * (count - 1)
            stages.append(nn.Sequential(*(BasicBlock(in_planes if i == 0 else planes, planes, s)
                                          for i, s in enumerate(strides))))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(in_planes, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(self.stages(self.stem(x))))


def ResNet18(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
    return ResNet([2, 2, 2, 2], in_channels, num_classes, width)


def ResNetSmall(in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks: int = 1) -> ResNet:
    return ResNet([blocks] * 3, in_channels, num_classes, width)


ARCHITECTURES = {"ResNet18": ResNet18, "ResNetSmall": ResNetSmall}
"""The constructors a manifest may name (``models.architecture``)."""
