"""A soft vote of the compared families, as one ONNX graph.

Families err on different rows (the trees on smooth boundaries, the linear model on interactions,
the network on heavy tails), so the average of their probabilities is often better than the best
of them. Equal weights need no fitting, so the vote's cross-validated score is as honest as each
member's: it is scored on the same folds from the members' own held-out predictions. Fitted
weights (`fitted_weights`: ensemble selection, Caruana et al. 2004, as AutoGluon's weighted
ensemble fits it) lean on the members that help; tasks/families.py scores them cross-fitted.

The members' graphs (each input 'features' -> 'probabilities') are merged under prefixes into one
graph that feeds them the same input and averages their outputs: the bundle contract is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# Every exported graph uses this default-domain opset (torch's exporter writes 20), so members merge.
GRAPH_OPSET = 20


@dataclass(frozen=True)
class EnsembleSpec:
    family: str  # "ensemble"
    n_features: int
    n_classes: int
    members: list[dict] = field(default_factory=list)  # each member's spec, as a dict
    weights: list[float] | None = None  # each member's share of the vote; None: equal

    def to_dict(self) -> dict:
        return {"family": self.family, "n_features": self.n_features, "n_classes": self.n_classes,
                "members": self.members, "weights": self.weights}


def average_probabilities(members: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    return np.average(np.stack(members), axis=0, weights=weights)


ENSEMBLE_ROUNDS = 20  # picks of ensemble selection: weights in steps of 1/20


def fitted_weights(y: np.ndarray, members: list[np.ndarray], score: Callable[[np.ndarray, np.ndarray], float],
                   rounds: int = ENSEMBLE_ROUNDS) -> list[float]:
    """Ensemble selection with replacement: `rounds` times, add the member whose addition gives the
    running average of held-out probabilities the best score(y, probabilities); a member's weight is
    its share of the picks. The score is the one the models are chosen by (AutoGluon fits its
    weighted ensemble on its eval metric too): weights fitted for log loss leaned on the best
    calibrated member (digits: the CNN 0.75, the SVM none), not on the one with the best macro F1."""
    picks = np.zeros(len(members))
    total = np.zeros_like(members[0], dtype=np.float64)
    for step in range(rounds):
        scores = [score(y, (total + member) / (step + 1)) for member in members]
        best = int(np.argmax(scores))  # ties: the earlier member
        picks[best] += 1
        total += members[best]
    return [float(pick / rounds) for pick in picks]


def merge_averaging(graphs: list[bytes], weights: list[float] | None = None) -> bytes:
    """One ONNX graph: 'features' -> every member graph -> the (weighted) mean of their 'probabilities'."""
    import onnx
    from onnx import compose, helper

    loaded = [compose.add_prefix(onnx.load_from_string(graph), f"m{index}_") for index, graph in enumerate(graphs)]
    first_input = loaded[0].graph.input[0]
    shares = np.asarray(weights if weights is not None else [1.0] * len(graphs), dtype=np.float64)
    shares = shares / shares.sum()
    nodes, initializers, outputs = [], [], []
    for index, model in enumerate(loaded):
        nodes.append(helper.make_node("Identity", ["features"], [f"m{index}_features"]))
        nodes.extend(model.graph.node)
        initializers.extend(model.graph.initializer)
        initializers.append(helper.make_tensor(f"m{index}_share", onnx.TensorProto.FLOAT, [], [float(shares[index])]))
        nodes.append(helper.make_node("Mul", [f"m{index}_probabilities", f"m{index}_share"], [f"m{index}_shared"]))
        outputs.append(f"m{index}_shared")
    nodes.append(helper.make_node("Sum", outputs, ["probabilities"]))
    width = first_input.type.tensor_type.shape.dim[1].dim_value
    features = helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", width])
    probabilities = helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", "classes"])
    graph = helper.make_graph(nodes, "ensemble", [features], [probabilities], initializers)
    opsets = {}
    for model in loaded:
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets.items()])
    merged.ir_version = max(model.ir_version for model in loaded)
    onnx.checker.check_model(merged)
    return merged.SerializeToString()
