"""Tabular regression (the course's linear regression / house-price network): standardised features -> standardised target."""

from collections.abc import Sequence

import torch
from torch import nn


class TabularRegressor(nn.Module):
    """Multi-layer perceptron over standardised features: x[B, n_features] -> y[B] (standardised target).

    With hidden=() it is plain linear regression; each hidden layer is Linear -> ReLU -> Dropout.
    """

    def __init__(self, n_features: int, hidden: Sequence[int] = (), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


ARCHITECTURES = {"TabularRegressor": TabularRegressor}
"""The constructors a manifest may name (``models.architecture``)."""


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py traces and checks: standardised features [N, F] in, standardised target [N] out."""
    features = torch.randn(batch_size, manifest["arch_kwargs"]["n_features"],
                           generator=torch.Generator().manual_seed(batch_size))
    return {"inputs": {"features": features}, "outputs": ["prediction"]}
