"""One spec describes any network maas trains; build / save / load keep it next to the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from models.cnn import SmallCNN
from models.mlp import TabularMLP


@dataclass(frozen=True)
class NetworkSpec:
    """Constructor arguments of a network: enough to rebuild it from its weights."""

    family: str  # "mlp" or "cnn"
    n_features: int
    n_classes: int
    hidden_sizes: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    cnn_channels: tuple[int, ...] = (16, 32)
    image_shape: tuple[int, int] | None = None  # (height, width) for cnn

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NetworkSpec:
        values = dict(values)
        for key in ("hidden_sizes", "cnn_channels", "image_shape"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def build_network(spec: NetworkSpec) -> nn.Module:
    """A freshly initialised network for the spec (seed torch first for reproducibility)."""
    if spec.family == "mlp":
        return TabularMLP(spec.n_features, spec.n_classes, spec.hidden_sizes, spec.dropout)
    if spec.family == "cnn":
        if spec.image_shape is None:
            raise ValueError("a cnn spec needs image_shape (height, width)")
        return SmallCNN(
            spec.image_shape, spec.n_classes, spec.cnn_channels, spec.hidden_sizes[0], spec.dropout
        )
    raise ValueError(f"unknown network family '{spec.family}'")


def save_network(network: nn.Module, spec: NetworkSpec, folder: Path) -> None:
    """Weights (state dict, no pickled classes) plus the spec as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), folder / "weights.pt")
    (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))


def load_network(folder: Path) -> tuple[nn.Module, NetworkSpec]:
    spec = NetworkSpec.from_dict(json.loads((folder / "spec.json").read_text()))
    network = build_network(spec)
    network.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return network.eval(), spec
