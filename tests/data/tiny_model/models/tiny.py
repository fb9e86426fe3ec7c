"""The throwaway model of the add-a-model test: y = 2 * x1 + 3 * x2, a torch builder as its architecture."""

from torch import nn

ARCHITECTURES = {"Linear": nn.Linear}
"""Any callable that takes the manifest's arch_kwargs and returns an nn.Module fits, as torchvision builders do."""
