"""Evaluation of the exported bundle on the held-out test split: what is measured is what serves."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sklearn import metrics as skm

from maas.bundle import MODEL_FILE, ModelBundle
from maas.orchestration import timed
from maas.tracking import log_metrics, mlflow_client


@dataclass
class Evaluation:
    metrics: dict[str, float]
    confusion: np.ndarray
    labels: list[str]
    size_bytes: int  # the ONNX graph on disk
    latency_p50_ms: float  # one raw row through preprocessing + graph
    latency_p99_ms: float
    confusion_png: Path


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, macro precision / recall / F1 and ROC-AUC (one-vs-rest macro for multiclass)."""
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(1)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, predicted, labels=np.arange(n_classes), average="macro", zero_division=0
    )
    if n_classes == 2:
        roc_auc = skm.roc_auc_score(y_true, probabilities[:, 1])
    else:
        # ORT's float32 softmax rows can sum to 1 +- 1e-7, which sklearn rejects; renormalise.
        normalised = probabilities / probabilities.sum(1, keepdims=True)
        roc_auc = skm.roc_auc_score(
            y_true, normalised, multi_class="ovr", average="macro", labels=np.arange(n_classes)
        )
    return {
        "accuracy": float(skm.accuracy_score(y_true, predicted)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "roc_auc": float(roc_auc),
    }


def single_row_latency_ms(bundle: ModelBundle, rows: pd.DataFrame, repeats: int = 200) -> tuple[float, float]:
    """p50 and p99 milliseconds to predict one raw row, after a warm-up."""
    samples = []
    for index in range(repeats + 20):
        row = rows.iloc[[index % len(rows)]]
        started = time.perf_counter()
        bundle.predict_proba(row)
        if index >= 20:
            samples.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def evaluate_bundle(bundle_dir: Path, x_test: pd.DataFrame, y_test: np.ndarray, report_dir: Path) -> Evaluation:
    """Load the bundle as serving does and score it on raw test rows; plots go to report_dir."""
    bundle = ModelBundle.load(bundle_dir)
    probabilities = bundle.predict_proba(x_test)
    predicted = probabilities.argmax(1)
    confusion = skm.confusion_matrix(y_test, predicted, labels=np.arange(len(bundle.labels)))
    p50, p99 = single_row_latency_ms(bundle, x_test)
    metrics = classification_metrics(y_test, probabilities)
    png = plot_confusion_matrix(
        confusion, bundle.labels, report_dir / "confusion_matrix.png",
        f"test split: accuracy {metrics['accuracy']:.3f}",
    )
    return Evaluation(
        metrics=metrics,
        confusion=confusion,
        labels=bundle.labels,
        size_bytes=(Path(bundle_dir) / MODEL_FILE).stat().st_size,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        confusion_png=png,
    )


def plot_confusion_matrix(confusion: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """Counts per (true, predicted) label as a PNG a person can read at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, col), count in np.ndenumerate(confusion):
        axes.text(col, row, str(count), ha="center", va="center",
                  color="white" if count > threshold else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="evaluate", retries=1, timeout_seconds=1800, cache_policy=NO_CACHE)
def evaluate_task(
    bundle_dir: Path, x_test: pd.DataFrame, y_test: np.ndarray, run_id: str
) -> tuple[Evaluation, float]:
    evaluation, seconds = timed(evaluate_bundle, bundle_dir, x_test, y_test, bundle_dir.parent)
    client = mlflow_client()
    log_metrics(client, run_id, {f"test/{name}": value for name, value in evaluation.metrics.items()})
    log_metrics(client, run_id, {
        "latency/p50_ms_b1": evaluation.latency_p50_ms,
        "latency/p99_ms_b1": evaluation.latency_p99_ms,
        "size/model_bytes": evaluation.size_bytes,
    })
    client.log_artifact(run_id, str(evaluation.confusion_png), artifact_path="evaluation")
    get_run_logger().info(
        "test: %s", "  ".join(f"{name} {value:.4f}" for name, value in evaluation.metrics.items())
    )
    return evaluation, seconds
