"""The course's image classifiers (chapter 6), one module per family, in the style of kuangliu/pytorch-cifar.

Every constructor takes ``in_channels`` and ``num_classes`` (from the data), accepts any input size (global
average pooling before the classifier) and exposes ``cam_layer``: the module whose output is the last convolutional
feature map, which the handler's Grad-CAM explanations attribute to.
"""

import torch


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py traces and checks (every family's module re-exports it): normalised images
    [N, C, size, size] in, logits [N, classes] out."""
    size, channels = manifest["input"]["size"], manifest["input"]["channels"]
    images = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(batch_size))
    return {"inputs": {"images": images}, "outputs": ["logits"]}
