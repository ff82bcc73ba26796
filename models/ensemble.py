"""An equal-weight soft vote of the compared families, as one ONNX graph.

Families err on different rows (the trees on smooth boundaries, the linear model on interactions,
the network on heavy tails), so the average of their probabilities is often better than the best
of them. Equal weights need no fitting, so the vote's cross-validated score is as honest as each
member's: it is scored on the same folds from the members' own held-out predictions.

The members' graphs (each input 'features' -> 'probabilities') are merged under prefixes into one
graph that feeds them the same input and averages their outputs: the bundle contract is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Every exported graph uses this default-domain opset (torch's exporter writes 20), so members merge.
GRAPH_OPSET = 20


@dataclass(frozen=True)
class EnsembleSpec:
    family: str  # "ensemble"
    n_features: int
    n_classes: int
    members: list[dict] = field(default_factory=list)  # each member's spec, as a dict

    def to_dict(self) -> dict:
        return {"family": self.family, "n_features": self.n_features, "n_classes": self.n_classes,
                "members": self.members}


def average_probabilities(members: list[np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(members), axis=0)


def merge_averaging(graphs: list[bytes]) -> bytes:
    """One ONNX graph: 'features' -> every member graph -> the mean of their 'probabilities'."""
    import onnx
    from onnx import compose, helper

    loaded = [compose.add_prefix(onnx.load_from_string(graph), f"m{index}_") for index, graph in enumerate(graphs)]
    first_input = loaded[0].graph.input[0]
    nodes, initializers, outputs = [], [], []
    for index, model in enumerate(loaded):
        nodes.append(helper.make_node("Identity", ["features"], [f"m{index}_features"]))
        nodes.extend(model.graph.node)
        initializers.extend(model.graph.initializer)
        outputs.append(f"m{index}_probabilities")
    nodes.append(helper.make_node("Sum", outputs, ["summed"]))
    scale = helper.make_tensor("member_share", onnx.TensorProto.FLOAT, [], [1.0 / len(graphs)])
    nodes.append(helper.make_node("Mul", ["summed", "member_share"], ["probabilities"]))
    width = first_input.type.tensor_type.shape.dim[1].dim_value
    features = helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", width])
    probabilities = helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", "classes"])
    graph = helper.make_graph(nodes, "ensemble", [features], [probabilities], [*initializers, scale])
    opsets = {}
    for model in loaded:
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets.items()])
    merged.ir_version = max(model.ir_version for model in loaded)
    onnx.checker.check_model(merged)
    return merged.SerializeToString()
