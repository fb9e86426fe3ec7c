"""cyclegan: unpaired image-to-image translation (the PyTorch course's chapter 9), two generators and their critics.

``ResnetGenerator`` (Johnson et al., as in the CycleGAN paper): a 7x7 convolution, stride-2 downsamplings (the
paper's two; the default model here has one, train/cyclegan.py), residual blocks, as many transposed-convolution
upsamplings and a 7x7 convolution to ``tanh``, with instance norm and reflection padding. ``PatchDiscriminator``:
the 70x70 PatchGAN's layers, scaled to small images, one real/fake score per patch. Training (train/cyclegan.py)
fits A->B and B->A with adversarial (least squares), cycle and identity losses.

``CycleGAN`` is what is served: both generators, and ``forward(images, to_a)`` translates each image the way its
``to_a`` flag says (False: A->B, True: B->A), running each generator only on its own images. Images are [N, C, H, W]
in [-1, 1] (``to_model``, ``to_pixels``), H and W multiples of 2 ** ``downsamplings``.

What the default model learns (train/cyclegan.py): Fashion-MNIST items as photographed (domain A: light items on
black, 28x28) <-> the same kinds of items as line drawings (domain B: dark strokes on white, the items' edges), from
disjoint sets of items: no item is seen in both domains, so nothing pairs an image with its translation.
"""

import numpy as np
import torch
from torch import nn

DIRECTIONS = ("a2b", "b2a")


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """c7s1-``width``, d(2 ``width``), d(4 ``width``), ``blocks`` x R(4 ``width``), u(2 ``width``), u(``width``),
    c7s1-``channels`` with tanh (``downsamplings`` 2, the paper's; with 1: d(2 ``width``), R(2 ``width``),
    u(``width``))."""

    def __init__(self, channels: int = 1, width: int = 32, blocks: int = 6, downsamplings: int = 2):
        super().__init__()
        factors = [2 ** step for step in range(downsamplings)]
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(channels, width, 7), nn.InstanceNorm2d(width), nn.ReLU(True)]
        for factor in factors:
            layers += [nn.Conv2d(width * factor, width * factor * 2, 3, stride=2, padding=1),
                       nn.InstanceNorm2d(width * factor * 2), nn.ReLU(True)]
        layers += [ResidualBlock(width * 2 ** downsamplings) for _ in range(blocks)]
        for factor in [2 * factor for factor in reversed(factors)]:
            layers += [nn.ConvTranspose2d(width * factor, width * factor // 2, 3, stride=2, padding=1,
                                          output_padding=1),
                       nn.InstanceNorm2d(width * factor // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, images):
        return self.model(images)


class PatchDiscriminator(nn.Module):
    """PatchGAN: C``width``-C(2 ``width``)-C(4 ``width``) with 4x4 convolutions (the first two stride 2), then one
    score per patch (a 5x5 map for a 28x28 image; each score's receptive field is 34x34, wider than the image, and the
    instance norms mix in the whole image)."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, width * 2, 4, stride=2, padding=1), nn.InstanceNorm2d(width * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width * 2, width * 4, 4, padding=1), nn.InstanceNorm2d(width * 4), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width * 4, 1, 4, padding=1))

    def forward(self, images):
        return self.model(images)


class CycleGAN(nn.Module):
    """The two generators: ``a2b`` and ``b2a``; ``forward(images, to_a)`` translates each image its own way."""

    def __init__(self, channels: int = 1, width: int = 32, blocks: int = 6, downsamplings: int = 2):
        super().__init__()
        self.a2b = ResnetGenerator(channels, width, blocks, downsamplings)
        self.b2a = ResnetGenerator(channels, width, blocks, downsamplings)

    def forward(self, images: torch.Tensor, to_a: torch.Tensor) -> torch.Tensor:
        to_b_rows, to_a_rows = torch.nonzero(~to_a).flatten(), torch.nonzero(to_a).flatten()
        translated = torch.zeros_like(images).index_copy(0, to_b_rows, self.a2b(images.index_select(0, to_b_rows)))
        return translated.index_copy(0, to_a_rows, self.b2a(images.index_select(0, to_a_rows)))


ARCHITECTURES = {"CycleGAN": CycleGAN}


def to_model(pixels: np.ndarray) -> torch.Tensor:
    """uint8 images [N, H, W] (grey) or [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    images = torch.from_numpy(np.ascontiguousarray(pixels))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.float().div_(127.5).sub_(1).contiguous()


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 images [N, H, W] (one channel) or [N, H, W, C]."""
    pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return (pixels[:, 0] if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1)).numpy()


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py exports: images [N, C, H, W] in [-1, 1] and a direction flag per image [N] in, the
    translated images out. Each generator runs on a data-dependent subset of the batch (rows picked by
    ``nonzero``), which TorchScript tracing and the TorchScript-based ONNX exporter capture as index operations;
    torch.export (and so AOTInductor, and the dynamo ONNX exporter) cannot without an unbacked size per generator."""
    size, channels = manifest["input"]["size"], manifest["input"]["channels"]
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.rand(batch_size, channels, size, size, generator=generator) * 2 - 1
    to_a = torch.arange(batch_size) % 2 == 1  # both directions in every checked batch (batch 1: A->B only)
    return {"inputs": {"images": images, "to_a": to_a}, "outputs": ["translated"],
            "exporter": {"onnx": "torchscript"},
            "unsupported": {"aoti": "torch.export cannot capture CycleGAN.forward: each generator runs on the images "
                                    "of its direction, a data-dependent batch size (rows picked by ``nonzero``)"}}
