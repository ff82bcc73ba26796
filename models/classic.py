"""The families beside the networks: scikit-learn's histogram gradient boosting (`hgb`), a
regularized logistic regression (`linear`, the baseline a network must beat) and a kernel SVM
(`svm`, RBF on features clipped at +-3 standard deviations). They read the same
preprocessed features as the networks and export to the same ONNX contract (input 'features'
float32 [batch, n_features] -> 'probabilities'), so one bundle runtime serves every family and
nothing is pickled.

Tree ensembles stay ahead of MLPs on many medium tables (Grinsztajn et al. 2022), and light
tuning of the GBDT matters more than the family (McElfresh et al. 2023): hence a small Optuna
study per family in tasks/families.py, its first trial scikit-learn's defaults.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLASSIC_FAMILIES = ("hgb", "linear", "svm")
# The SVM sees standardized features clipped here: an RBF kernel is a distance, and a column that is
# nearly constant in training (a rarely inked pixel of digits) standardizes to values of 10-30 that
# swamp every other column's share of it. Clipped, 5x2-fold CV macro F1 on digits went from 0.983
# to 0.991 and on breast_cancer from 0.966 to 0.973 (wine unchanged at 0.990).
SVM_CLIP = 3.0
ONNX_OPSET = {"": 20, "ai.onnx.ml": 3}  # the default domain as torch exports (models/ensemble.py merges them)


@dataclass(frozen=True)
class ClassicSpec:
    """A scikit-learn model: its family and constructor parameters (JSON-able, in the bundle)."""

    family: str  # "hgb", "linear" or "svm"
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

        return LogisticRegression(max_iter=3000, **spec.params, **linear_solver(spec))
    if spec.family == "svm":
        return ClippedSVM(spec.params.get("C", 1.0), spec.params.get("gamma_scale", 1.0) / spec.n_features, seed)
    raise ValueError(f"unknown family '{spec.family}' (one of {', '.join(CLASSIC_FAMILIES)})")


def linear_solver(spec: ClassicSpec) -> dict:
    """The solver for the logistic regression's penalty: lbfgs for L2 (l1_ratio 0, scikit-learn's
    default); with an L1 part, liblinear on two classes (a 400 x 1,500 table: 0.02 s a fit) and saga,
    to a looser tolerance, on more (liblinear takes two only; saga at its default took 3-6 s a fit
    on digits)."""
    if not spec.params.get("l1_ratio"):
        return {}
    return {"solver": "liblinear"} if spec.n_classes == 2 else {"solver": "saga", "tol": 1e-3}


def fit_classic(spec: ClassicSpec, x: np.ndarray, y: np.ndarray, seed: int):
    """Fit on preprocessed features. On small tables one OpenMP thread: the boosting's threads only
    wait on each other there (and spin against a busy machine's other work)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1 if len(x) < 20_000 else None):
        return build_classic(spec, seed).fit(x, y)


class ClippedSVM:
    """An RBF support vector classifier on features clipped to +-SVM_CLIP, with Platt-scaled
    probabilities (the vote averages probabilities, so raw margins would not do). gamma is given per
    feature count, as scikit-learn's 'scale' is for unit-variance features."""

    def __init__(self, C: float, gamma: float, seed: int):
        from sklearn.svm import SVC

        self.svc = SVC(C=C, gamma=gamma, probability=True, random_state=seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> ClippedSVM:
        with _platt_deprecation_ignored():
            self.svc.fit(np.clip(x, -SVM_CLIP, SVM_CLIP), y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.svc.predict_proba(np.clip(x, -SVM_CLIP, SVM_CLIP))


@contextmanager
def _platt_deprecation_ignored():
    """scikit-learn 1.9 deprecates SVC(probability=True) (and its probA_/probB_, which skl2onnx reads)
    for CalibratedClassifierCV, which skl2onnx cannot export with ensemble=False: keep the SVC's own
    Platt scaling, quietly, until skl2onnx converts the replacement."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*(`probability`|probA_|probB_)", FutureWarning)
        yield


def classic_size(estimator) -> int:
    """Parameters, comparable to a network's: tree nodes, weights and biases, or support vectors'
    values and dual coefficients."""
    if isinstance(estimator, ClippedSVM):
        return int(estimator.svc.support_vectors_.size + estimator.svc.dual_coef_.size)
    if hasattr(estimator, "_predictors"):
        return int(sum(len(tree.nodes) for trees in estimator._predictors for tree in trees))
    return int(estimator.coef_.size + estimator.intercept_.size)


def export_classic_onnx(estimator, n_features: int, path: Path) -> None:
    """The fitted estimator as ONNX with the bundle's input and output names."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    _allow_boolean_tree_attributes()
    inner = estimator.svc if isinstance(estimator, ClippedSVM) else estimator
    with _platt_deprecation_ignored():
        graph = to_onnx(inner, initial_types=[("features", FloatTensorType([None, n_features]))],
                        options={id(inner): {"zipmap": False}}, target_opset=ONNX_OPSET)
    if isinstance(estimator, ClippedSVM):
        graph = _clip_input(graph, SVM_CLIP)
    path.write_bytes(graph.SerializeToString())


def _clip_input(graph, bound: float):
    """The graph with its input 'features' clipped to +-bound before anything reads it."""
    from onnx import TensorProto, helper

    for node in graph.graph.node:
        node.input[:] = ["features_clipped" if name == "features" else name for name in node.input]
    graph.graph.initializer.extend([helper.make_tensor("clip_low", TensorProto.FLOAT, [], [-bound]),
                                    helper.make_tensor("clip_high", TensorProto.FLOAT, [], [bound])])
    graph.graph.node.insert(0, helper.make_node("Clip", ["features", "clip_low", "clip_high"], ["features_clipped"]))
    return graph


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
