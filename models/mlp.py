"""Multilayer perceptron for tabular features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class TabularMLP(nn.Module):
    """Linear-ReLU-dropout blocks, logits out.

    No batch norm: it makes batch-1 serving differ from batched evaluation and adds little on
    standardised tabular inputs.
    """

    def __init__(self, n_features: int, n_classes: int, hidden_sizes: Sequence[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width_in = n_features
        for width in hidden_sizes:
            layers += [nn.Linear(width_in, width), nn.ReLU(), nn.Dropout(dropout)]
            width_in = width
        layers.append(nn.Linear(width_in, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)
