"""The families beside the networks: scikit-learn's histogram gradient boosting (`hgb`) and a
regularized logistic regression (`linear`, the baseline a network must beat). They read the same
preprocessed features as the networks and export to the same ONNX contract (input 'features'
float32 [batch, n_features] -> 'probabilities'), so one bundle runtime serves every family and
nothing is pickled.

Tree ensembles stay ahead of MLPs on many medium tables (Grinsztajn et al. 2022), and light
tuning of the GBDT matters more than the family (McElfresh et al. 2023): hence a small Optuna
study per family in tasks/families.py, its first trial scikit-learn's defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLASSIC_FAMILIES = ("hgb", "linear")
ONNX_OPSET = {"": 20, "ai.onnx.ml": 3}  # the default domain as torch exports (models/ensemble.py merges them)


@dataclass(frozen=True)
class ClassicSpec:
    """A scikit-learn model: its family and constructor parameters (JSON-able, in the bundle)."""

    family: str  # "hgb" or "linear"
    n_features: int
    n_classes: int
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def build_classic(spec: ClassicSpec, seed: int):
    """The unfitted estimator for the spec."""
    if spec.family == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(random_state=seed, **spec.params)
    if spec.family == "linear":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=3000, **spec.params)
    raise ValueError(f"unknown family '{spec.family}' (one of {', '.join(CLASSIC_FAMILIES)})")


def fit_classic(spec: ClassicSpec, x: np.ndarray, y: np.ndarray, seed: int):
    """Fit on preprocessed features. On small tables one OpenMP thread: the boosting's threads only
    wait on each other there (and spin against a busy machine's other work)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1 if len(x) < 20_000 else None):
        return build_classic(spec, seed).fit(x, y)


def classic_size(estimator) -> int:
    """Parameters, comparable to a network's: tree nodes, or weights and biases."""
    if hasattr(estimator, "_predictors"):
        return int(sum(len(tree.nodes) for trees in estimator._predictors for tree in trees))
    return int(estimator.coef_.size + estimator.intercept_.size)


def export_classic_onnx(estimator, n_features: int, path: Path) -> None:
    """The fitted estimator as ONNX with the bundle's input and output names."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    _allow_boolean_tree_attributes()
    graph = to_onnx(estimator, initial_types=[("features", FloatTensorType([None, n_features]))],
                    options={id(estimator): {"zipmap": False}}, target_opset=ONNX_OPSET)
    path.write_bytes(graph.SerializeToString())


def _allow_boolean_tree_attributes() -> None:
    """skl2onnx 1.20 passes HistGradientBoosting's missing-value flags as Python bools, which
    onnx >= 1.19 refuses in an int list ("Expected an int, got a boolean"): cast them to int."""
    import numpy as np
    from skl2onnx.common import _container

    container = _container.ModelComponentContainer
    if getattr(container.add_node, "_maas_fixed", False):
        return
    original = container.add_node

    def add_node(self, op_type, inputs, outputs, op_domain="", op_version=None, name=None, **attrs):
        for key, value in attrs.items():
            if isinstance(value, (list, tuple)) and any(isinstance(item, (bool, np.bool_)) for item in value):
                attrs[key] = [int(item) for item in value]
        return original(self, op_type, inputs, outputs, op_domain=op_domain, op_version=op_version, name=name, **attrs)

    add_node._maas_fixed = True
    container.add_node = add_node
