"""Export a trained network and its preprocessing as the model bundle (see maas/bundle.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maas.bundle import ENCODER_DIR, FORMAT_VERSION, METADATA_FILE, MODEL_FILE, PREPROCESSING_FILE, persistable
from models import NetworkSpec
from models.classic import ClassicSpec, export_classic_onnx
from models.ensemble import EnsembleSpec
from tasks.data import PreparedData


def export_onnx(network: nn.Module, n_features: int, path: Path) -> None:
    """The network plus softmax as an ONNX graph with a dynamic batch axis.

    Uses the TorchScript exporter: on these small networks it takes ~0.2 s where the dynamo
    exporter takes ~5 s, for the same graph. It warns that it is legacy; that is known and pinned.
    """
    with_softmax = nn.Sequential(network, nn.Softmax(dim=1)).eval()
    example = torch.zeros(2, n_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            with_softmax,
            (example,),
            str(path),
            input_names=["features"],
            output_names=["probabilities"],
            dynamic_axes={"features": {0: "batch"}, "probabilities": {0: "batch"}},
            dynamo=False,
        )


def write_bundle(folder: Path, model: Any, spec: NetworkSpec | ClassicSpec | EnsembleSpec, prepared: PreparedData) -> Path:
    """Write model.onnx, preprocessing.json and metadata.json into folder; returns folder. From the
    data it was trained on, the bundle carries the fitted preprocessing, labels, target and schema.
    `model`: a torch network, a fitted scikit-learn estimator (ClassicSpec) or a merged graph's
    bytes (EnsembleSpec)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, EnsembleSpec):
        (folder / MODEL_FILE).write_bytes(model)  # the merged graph (models/ensemble.py)
    elif isinstance(spec, ClassicSpec):
        export_classic_onnx(model, spec.n_features, folder / MODEL_FILE)
    else:
        export_onnx(model, spec.n_features, folder / MODEL_FILE)
    (folder / PREPROCESSING_FILE).write_text(json.dumps(persistable(prepared.preprocessing), indent=1))
    texts = prepared.preprocessing.get("text", [])
    if texts:  # the encoder travels inside the bundle: tokenizer.json, encoder.onnx, encoder.json
        shutil.copytree(texts[0]["_encoder_dir"], folder / ENCODER_DIR, dirs_exist_ok=True)
    metadata = {
        "format_version": FORMAT_VERSION,
        "labels": prepared.labels,
        "label_type": prepared.label_type,  # pyfunc's labels: the target column's type (bundle.LABEL_TYPES)
        "target": prepared.target,
        "input_schema": prepared.input_schema,
        "dropped_columns": prepared.dropped_columns,  # in the training file, not read: serving ignores them
        "network": spec.to_dict(),
        "metrics": {},
    }
    if texts:
        metadata["text"] = {column["name"]: {"encoder": column["encoder"], "precision": column["precision"],
                                             "max_length_tokens": column["max_length"],
                                             "longer_texts": "truncated to max_length_tokens"} for column in texts}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return folder


def update_metadata(folder: Path, **fields: Any) -> dict[str, Any]:
    """Add fields known only later (test metrics, the reproducibility manifest)."""
    path = folder / METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata.update(fields)
    path.write_text(json.dumps(metadata, indent=1))
    return metadata
