"""The throwaway model of the add-a-model test: y = 2 * x1 + 3 * x2, a torch builder as its architecture."""

import torch
from torch import nn

ARCHITECTURES = {"Linear": nn.Linear}
"""Any callable that takes the manifest's arch_kwargs and returns an nn.Module fits, as torchvision builders do."""


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py traces to model.ts.pt and model.onnx: features [N, 2] in, y [N, 1] out."""
    features = torch.randn(batch_size, manifest["arch_kwargs"]["in_features"], generator=torch.Generator().manual_seed(0))
    return {"inputs": {"features": features}, "outputs": ["y"]}
