"""PyTorch network families, each built from a plain, JSON-able spec of hyperparameters."""

from models.spec import NetworkSpec, build_network, load_network, save_network

__all__ = ["NetworkSpec", "build_network", "load_network", "save_network"]
