"""Evaluation of the exported bundle on the held-out test split: what is measured is what serves."""

from __future__ import annotations

import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sklearn import metrics as skm

from maas.bundle import MODEL_FILE, ModelBundle, transform
from maas.tracking import log_metrics, log_params, mlflow_client, start_child_run


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call of the served graph at one batch size, and the rows/s that gives."""

    batch: int
    p50_ms: float
    p99_ms: float
    rows_per_s: float


@dataclass
class Evaluation:
    metrics: dict[str, float]
    confusion: np.ndarray
    labels: list[str]
    size_bytes: int  # the ONNX graph on disk
    compressed_bytes: int  # the same, zlib-compressed (what zeroed weights save when stored)
    latency_p50_ms: float  # one raw row through preprocessing + graph
    latency_p99_ms: float
    confusion_png: Path
    graph_latency: dict[int, Latency] = field(default_factory=dict)  # batch size -> graph-only timing
    probabilities: np.ndarray | None = None

    def figures(self) -> dict[str, float]:
        """Flat metric names for MLflow and the summary."""
        figures = {f"test/{name}": value for name, value in self.metrics.items()}
        figures.update({"size/model_bytes": self.size_bytes, "size/compressed_bytes": self.compressed_bytes,
                        "latency/p50_ms_b1_e2e": self.latency_p50_ms, "latency/p99_ms_b1_e2e": self.latency_p99_ms})
        for batch, timing in self.graph_latency.items():
            figures.update({f"latency/p50_ms_b{batch}": timing.p50_ms, f"latency/p99_ms_b{batch}": timing.p99_ms,
                            f"throughput/rows_per_s_b{batch}": timing.rows_per_s})
        return figures


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


def graph_latency(bundle: ModelBundle, features: np.ndarray, batch: int, budget_s: float = 1.0) -> Latency:
    """Time the served graph alone on preprocessed rows: warm-up, then repeat until ~budget_s.

    At least 50 calls are timed so p99 rests on real samples; the budget keeps wide graphs cheap.
    """
    rows = np.resize(features, (batch, features.shape[1])).astype(np.float32)
    for _ in range(10):
        bundle.predict_features(rows)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 50 or (time.perf_counter() < deadline and len(samples) < 5000):
        started = time.perf_counter()
        bundle.predict_features(rows)
        samples.append((time.perf_counter() - started) * 1000)
    p50 = float(np.percentile(samples, 50))
    return Latency(batch, p50, float(np.percentile(samples, 99)), batch / (p50 / 1000))


def evaluate_bundle(
    bundle_dir: Path, x_test: pd.DataFrame, y_test: np.ndarray, report_dir: Path, batches: tuple[int, ...] = (1, 64),
) -> Evaluation:
    """Load the bundle as serving does and score it on raw test rows; plots go to report_dir."""
    bundle = ModelBundle.load(bundle_dir)
    probabilities = bundle.predict_proba(x_test)
    predicted = probabilities.argmax(1)
    confusion = skm.confusion_matrix(y_test, predicted, labels=np.arange(len(bundle.labels)))
    p50, p99 = single_row_latency_ms(bundle, x_test)
    features = transform(x_test, bundle.preprocessing)
    timings = {batch: graph_latency(bundle, features, batch) for batch in batches}
    graph_bytes = (Path(bundle_dir) / MODEL_FILE).read_bytes()
    metrics = classification_metrics(y_test, probabilities)
    png = plot_confusion_matrix(
        confusion, bundle.labels, report_dir / "confusion_matrix.png",
        f"test split: accuracy {metrics['accuracy']:.3f}",
    )
    return Evaluation(
        metrics=metrics,
        confusion=confusion,
        labels=bundle.labels,
        size_bytes=len(graph_bytes),
        compressed_bytes=len(zlib.compress(graph_bytes, 9)),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        confusion_png=png,
        graph_latency=timings,
        probabilities=probabilities,
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


# --- every variant, side by side -------------------------------------------------------------------


def variant_row(variant, evaluation: Evaluation, reference: Evaluation) -> dict:
    """One line of the comparison: quality, size, speed, and each as a ratio to fp32."""
    b1, b64 = evaluation.graph_latency[1], evaluation.graph_latency[64]
    ref64 = reference.graph_latency[64]
    return {
        "name": variant.name,
        **{name: round(value, 4) for name, value in evaluation.metrics.items()},
        "agreement_with_fp32": round(float((evaluation.probabilities.argmax(1) == reference.probabilities.argmax(1)).mean()), 4),
        "parameters": variant.parameters,
        "nonzero_parameters": variant.nonzero_parameters,
        "size_bytes": evaluation.size_bytes,
        "compressed_bytes": evaluation.compressed_bytes,
        "p50_ms_b1": round(b1.p50_ms, 4), "p99_ms_b1": round(b1.p99_ms, 4),
        "p50_ms_b64": round(b64.p50_ms, 4), "p99_ms_b64": round(b64.p99_ms, 4),
        "rows_per_s_b64": round(b64.rows_per_s),
        "p50_ms_b1_e2e": round(evaluation.latency_p50_ms, 4), "p99_ms_b1_e2e": round(evaluation.latency_p99_ms, 4),
        "speedup_b64_vs_fp32": round(ref64.p50_ms / b64.p50_ms, 3),
        "size_ratio_vs_fp32": round(reference.size_bytes / evaluation.size_bytes, 3),
        "compressed_ratio_vs_fp32": round(reference.compressed_bytes / evaluation.compressed_bytes, 3),
        "f1_drop_points_vs_fp32": round(100 * (reference.metrics["f1_macro"] - evaluation.metrics["f1_macro"]), 3),
        "accuracy_drop_points_vs_fp32": round(100 * (reference.metrics["accuracy"] - evaluation.metrics["accuracy"]), 3),
    }


def plot_quality_vs_latency(rows: list[dict], path: Path, title: str) -> Path:
    """Macro F1 against batch-64 latency per variant; marker area follows size on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    biggest = max(row["size_bytes"] for row in rows)
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        axes.scatter(row["p50_ms_b64"], row["f1_macro"], s=60 + 900 * row["size_bytes"] / biggest, alpha=0.6)
        axes.annotate(f"{row['name']}\n{row['size_bytes'] / 1024:.0f} KiB", (row["p50_ms_b64"], row["f1_macro"]),
                      textcoords="offset points", xytext=(8, 4), fontsize=8)
    axes.set_xlabel("p50 latency at batch 64 (ms, ONNX Runtime, CPU)")
    axes.set_ylabel("test macro F1")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="evaluate-variants", retries=0, timeout_seconds=3600, cache_policy=NO_CACHE)
def evaluate_variants_task(
    variants: list, failures: list, x_test: pd.DataFrame, y_test: np.ndarray, run_id: str, experiment_id: str,
    report_dir: Path,
) -> tuple[dict[str, Evaluation], list[dict], float]:
    """Each variant's bundle scored and timed as served; one MLflow child run per variant (failed
    ones too, marked FAILED), and the comparison table and quality-vs-latency plot on the parent."""
    started = time.perf_counter()
    client = mlflow_client()
    logger = get_run_logger()
    evaluations: dict[str, Evaluation] = {}
    rows = []
    for failure in failures:
        child = start_child_run(client, experiment_id, run_id, f"variant-{failure.name}",
                                {"maas.variant": failure.name, "maas.variant_error": failure.error[:5000]})
        client.set_terminated(child, status="FAILED")
    for variant in variants:
        try:
            evaluation = evaluate_bundle(variant.bundle_dir, x_test, y_test, variant.bundle_dir)
        except Exception as error:
            if variant.name == "fp32":
                raise
            logger.warning("variant %s could not be evaluated and is skipped: %s: %s",
                           variant.name, error.__class__.__name__, error)
            child = start_child_run(client, experiment_id, run_id, f"variant-{variant.name}",
                                    {"maas.variant": variant.name, "maas.variant_error": str(error)[:5000]})
            client.set_terminated(child, status="FAILED")
            continue
        evaluations[variant.name] = evaluation
        row = variant_row(variant, evaluation, evaluations["fp32"])
        rows.append(row)
        child = start_child_run(client, experiment_id, run_id, f"variant-{variant.name}", {"maas.variant": variant.name})
        log_params(client, child, {"variant": variant.name, **{f"variant.{k}": v for k, v in variant.details.items()}})
        log_metrics(client, child, {**evaluation.figures(), "parameters": variant.parameters,
                                    "nonzero_parameters": variant.nonzero_parameters,
                                    "agreement_with_fp32": row["agreement_with_fp32"]})
        client.log_artifact(child, str(evaluation.confusion_png), artifact_path="evaluation")
        client.set_terminated(child, status="FINISHED")
    plot = plot_quality_vs_latency(rows, report_dir / "quality_vs_latency.png", "variants on the test split")
    client.log_artifact(run_id, str(plot), artifact_path="variants")
    with warnings.catch_warnings():  # MLflow's own select_dtypes call warns under pandas 3
        warnings.filterwarnings("ignore", message=".*select_dtypes.*")
        client.log_table(run_id, pd.DataFrame(rows), "variants/comparison.json")
    for row in rows:
        logger.info("variant %-10s F1 %.4f  %8d bytes  %7.3f ms @64  x%.2f speed  x%.2f smaller",
                    row["name"], row["f1_macro"], row["size_bytes"], row["p50_ms_b64"],
                    row["speedup_b64_vs_fp32"], row["size_ratio_vs_fp32"])
    return evaluations, rows, time.perf_counter() - started
