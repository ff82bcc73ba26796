"""Evaluation of the exported bundles as they serve: every variant on the validation split (to
choose one), the chosen one on the held-out test split (tasks/registry.py, once)."""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn import metrics as skm

from maas.bundle import ENCODER_DIR, MODEL_FILE, PREPROCESSING_FILE, ModelBundle, decide, transform, with_encoder
from maas.figures import IN_SAMPLE, log_variant_comparison, write_variant_run
from maas.run_context import RunContext, write_child_run
from tasks.compress import FailedVariant, Variant, Variants
from tasks.data import DataSplits


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
    graph_latency: dict[int, Latency] = field(default_factory=dict)  # batch size -> graph-only timing
    probabilities: np.ndarray | None = None
    split: str = "test"  # where the metrics were measured: "val" chooses the variant, "test" reports it
    # (IN_SAMPLE: validation rows the model was fitted on)
    decision: dict | None = None  # the bundle's decision rule (maas.bundle.decide), which its labels follow
    encoder_bytes: int = 0  # a text bundle's encoder and tokenizer, which serving loads beside the graph

    def predicted(self) -> np.ndarray:
        """The class index the bundle answers each row with."""
        return decide(self.probabilities, self.decision)

    def figures(self) -> dict[str, float]:
        """Flat metric names for MLflow and the summary."""
        figures = {f"{self.split}/{name}": value for name, value in self.metrics.items()}
        figures.update({"size/model_bytes": self.size_bytes, "size/compressed_bytes": self.compressed_bytes,
                        "latency/p50_ms_b1_e2e": self.latency_p50_ms, "latency/p99_ms_b1_e2e": self.latency_p99_ms})
        for batch, timing in self.graph_latency.items():
            figures.update({f"latency/p50_ms_b{batch}": timing.p50_ms, f"latency/p99_ms_b{batch}": timing.p99_ms,
                            f"throughput/rows_per_s_b{batch}": timing.rows_per_s})
        return figures


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, decision: dict | None = None
                           ) -> dict[str, float]:
    """Accuracy, macro precision / recall / F1 of the labels answered (by `decision`: decide) and
    ROC-AUC (one-vs-rest macro for multiclass)."""
    n_classes = probabilities.shape[1]
    predicted = decide(probabilities, decision)
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


LATENCY_WARMUP, LATENCY_REPEATS = 20, 200
TIMED_BATCHES = (1, 64)  # the served graph's batch sizes timed


def single_row_latency_ms(bundle: ModelBundle, rows: pd.DataFrame) -> tuple[float, float]:
    """p50 and p99 milliseconds to predict one raw row, after a warm-up."""
    samples = []
    for index in range(LATENCY_REPEATS + LATENCY_WARMUP):
        row = rows.iloc[[index % len(rows)]]
        started = time.perf_counter()
        bundle.predict_proba(row)
        if index >= LATENCY_WARMUP:
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


def transformed_rows(bundle_dir: Path, rows: pd.DataFrame) -> np.ndarray:
    """Raw rows through a bundle's preprocessing, once, for its scores and its graph's timing.

    A text column is embedded here, one text per call as served: 57 s a pass over 3,543 validation
    sentences on one thread of a Zen 1 EPYC. So it embeds on every core (a one-thread session per
    core: the served thread's embeddings to the bit, tests/unit/test_text.py); the latency timings
    run on the served threads. Rows this process embedded already with the same encoder (the data
    stage's validation rows, under the pretrained encoder) come from its memo (maas/bundle.py
    shared_memo)."""
    folder = Path(bundle_dir)
    return transform(rows, with_encoder(json.loads((folder / PREPROCESSING_FILE).read_text()), folder / ENCODER_DIR,
                                        memo=True))


def preprocessing_signature(bundle_dir: Path) -> tuple[bytes, tuple[tuple[str, int], ...]]:
    """What a bundle's transform depends on, cheaply: its preprocessing.json (which holds the text
    columns' fitted standardisation) and its encoder files' names and sizes, not their 22-90 MB."""
    folder = Path(bundle_dir)
    encoder = tuple((path.name, path.stat().st_size) for path in sorted((folder / ENCODER_DIR).glob("*")))
    return (folder / PREPROCESSING_FILE).read_bytes(), encoder


def evaluate_bundle(bundle_dir: Path, x_test: pd.DataFrame, y_test: np.ndarray, threads: int | None = 1,
                    split: str = "test", features: np.ndarray | None = None) -> Evaluation:
    """Load the bundle as serving does (ONNX Runtime on `threads` threads, serving.model_threads;
    None: one per core) and score it on raw rows of `split`, timing it as it would serve.
    features: x_test already through this bundle's preprocessing (evaluate_variants shares fp32's)."""
    bundle = ModelBundle.load(bundle_dir, threads)
    if features is None:
        features = transformed_rows(bundle_dir, x_test)
    probabilities = bundle.predict_features(features)
    predicted = decide(probabilities, bundle.decision)
    confusion = skm.confusion_matrix(y_test, predicted, labels=np.arange(len(bundle.labels)))
    p50, p99 = single_row_latency_ms(bundle, x_test)
    timings = {batch: graph_latency(bundle, features, batch) for batch in TIMED_BATCHES}
    graph_bytes = (Path(bundle_dir) / MODEL_FILE).read_bytes()
    return Evaluation(
        metrics=classification_metrics(y_test, probabilities, bundle.decision),
        confusion=confusion,
        labels=bundle.labels,
        size_bytes=len(graph_bytes),
        compressed_bytes=len(zlib.compress(graph_bytes, 9)),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        graph_latency=timings,
        probabilities=probabilities,
        split=split,
        decision=bundle.decision,
        encoder_bytes=sum(path.stat().st_size for path in (Path(bundle_dir) / ENCODER_DIR).glob("*") if path.is_file()),
    )


# --- every variant, side by side -------------------------------------------------------------------


IN_SAMPLE_NOTE = "(F1 in-sample: fitted on the validation rows)"


@dataclass(frozen=True)
class VariantRow:
    """One variant's line of the comparison: test quality, size, speed as served, and each as a ratio
    to fp32. Figures not given default to zero, so a hand-made row for a policy test stays short."""

    name: str
    metrics: dict[str, float]  # test split: accuracy, precision / recall / F1 (macro), roc_auc
    agreement_with_fp32: float = 1.0
    parameters: int = 0
    nonzero_parameters: int = 0
    size_bytes: int = 0
    compressed_bytes: int = 0
    encoder_bytes: int = 0  # a text bundle's encoder and tokenizer: the data stage chose one for every variant
    p50_ms_b1: float = 0.0
    p99_ms_b1: float = 0.0
    p50_ms_b64: float = 0.0
    p99_ms_b64: float = 0.0
    rows_per_s_b64: float = 0.0
    p50_ms_b1_e2e: float = 0.0
    p99_ms_b1_e2e: float = 0.0
    speedup_b64_vs_fp32: float = 1.0
    size_ratio_vs_fp32: float = 1.0
    compressed_ratio_vs_fp32: float = 1.0
    f1_drop_points_vs_fp32: float = 0.0
    accuracy_drop_points_vs_fp32: float = 0.0
    split: str = "val"  # IN_SAMPLE: the figures are on rows the variant was fitted on

    @property
    def in_sample(self) -> bool:
        return self.split == IN_SAMPLE

    @property
    def f1_macro(self) -> float:
        return self.metrics["f1_macro"]

    def figures(self) -> dict[str, Any]:
        """Everything but the name and the quality metrics."""
        return {name: value for name, value in asdict(self).items() if name not in ("name", "metrics")}

    def flat(self) -> dict[str, Any]:
        """One flat record: the Prefect table and MLflow's variants/comparison.json."""
        return {"name": self.name, **self.metrics, **self.figures()}

    def summary(self) -> dict[str, Any]:
        """The CLI contract's entry: name, metrics, size_bytes, latency_ms (one raw row), then the rest."""
        return {"name": self.name, "metrics": dict(self.metrics), "latency_ms": self.p50_ms_b1_e2e, **self.figures()}


def variant_row(variant, evaluation: Evaluation, reference: Evaluation) -> VariantRow:
    """A variant's line, with its ratios taken against the fp32 reference."""
    b1, b64 = evaluation.graph_latency[1], evaluation.graph_latency[64]
    ref64 = reference.graph_latency[64]
    agreement = (evaluation.predicted() == reference.predicted()).mean()
    return VariantRow(
        name=variant.name,
        metrics={name: round(value, 4) for name, value in evaluation.metrics.items()},
        agreement_with_fp32=round(float(agreement), 4),
        parameters=variant.parameters,
        nonzero_parameters=variant.nonzero_parameters,
        size_bytes=evaluation.size_bytes,
        compressed_bytes=evaluation.compressed_bytes,
        encoder_bytes=evaluation.encoder_bytes,
        p50_ms_b1=round(b1.p50_ms, 4), p99_ms_b1=round(b1.p99_ms, 4),
        p50_ms_b64=round(b64.p50_ms, 4), p99_ms_b64=round(b64.p99_ms, 4),
        rows_per_s_b64=round(b64.rows_per_s),
        p50_ms_b1_e2e=round(evaluation.latency_p50_ms, 4), p99_ms_b1_e2e=round(evaluation.latency_p99_ms, 4),
        speedup_b64_vs_fp32=round(ref64.p50_ms / b64.p50_ms, 3),
        size_ratio_vs_fp32=round(reference.size_bytes / evaluation.size_bytes, 3),
        compressed_ratio_vs_fp32=round(reference.compressed_bytes / evaluation.compressed_bytes, 3),
        f1_drop_points_vs_fp32=round(100 * (reference.metrics["f1_macro"] - evaluation.metrics["f1_macro"]), 3),
        accuracy_drop_points_vs_fp32=round(100 * (reference.metrics["accuracy"] - evaluation.metrics["accuracy"]), 3),
        split=evaluation.split,
    )


@dataclass(frozen=True)
class VariantTable:
    """Every evaluated variant side by side; `render` is how a person reads it."""

    rows: list[VariantRow]

    def __getitem__(self, name: str) -> VariantRow:
        return next(row for row in self.rows if row.name == name)

    def flat(self) -> list[dict[str, Any]]:
        return [row.flat() for row in self.rows]

    def render(self) -> str:
        lines = ["  variant      F1      size  ms@64  speed  smaller"]
        for row in self.rows:
            lines.append(f"  {row.name:<10} {row.f1_macro:.4f} {row.size_bytes / 1024:6.0f}K "
                         f"{row.p50_ms_b64:6.3f}  x{row.speedup_b64_vs_fp32:.2f}  x{row.size_ratio_vs_fp32:.2f}"
                         + (f"  {IN_SAMPLE_NOTE}" if row.in_sample else ""))
        return "\n".join(lines)


@dataclass
class Scores:
    """The evaluation stage's result: each variant's figures, the comparison table, what failed."""

    variants: list[Variant]
    evaluations: dict[str, Evaluation]
    table: VariantTable
    failed: list[FailedVariant]


def evaluate_variants(variants: Variants, x_val: pd.DataFrame, y_val: np.ndarray, threads: int | None = 1) -> Scores:
    """Each variant's bundle scored and timed as served (`threads`: serving.model_threads), on the same
    validation rows (the test split is kept for the chosen one's report); a variant that cannot be
    evaluated joins the failures (fp32, the reference, must)."""
    evaluated, evaluations, rows = [], {}, []
    failed = list(variants.failed)
    # The variants are built from one prepared data set, so they share fp32's features: transformed
    # once here, not once per variant (a text column's embedding is most of the stage).
    reference = variants.built[0].bundle_dir
    shared, signature = transformed_rows(reference, x_val), preprocessing_signature(reference)
    for variant in variants.built:
        try:
            same = preprocessing_signature(variant.bundle_dir) == signature
            evaluation = evaluate_bundle(variant.bundle_dir, x_val, y_val, threads,
                                         split=IN_SAMPLE if variant.saw_validation else "val",
                                         features=shared if same else None)
        except Exception as error:
            if variant.name == "fp32":
                raise
            failed.append(FailedVariant(variant.name, f"{error.__class__.__name__}: {error}"))
            continue
        evaluated.append(variant)
        evaluations[variant.name] = evaluation
        rows.append(variant_row(variant, evaluation, evaluations["fp32"]))
    return Scores(evaluated, evaluations, VariantTable(rows), failed)


def record_evaluation(ctx: RunContext, scores: Scores) -> None:
    """A child run per variant (its figures and confusion matrix; FAILED with the error for those
    that failed), and the comparison table and quality-vs-latency plot on the parent run. Deferred:
    nothing downstream reads them."""
    for failure in scores.failed:
        ctx.logger.warning("variant %s is skipped: %s", failure.name, failure.error)
        ctx.defer(write_child_run, ctx.ref, f"variant-{failure.name}",
                  {"maas.variant": failure.name, "maas.variant_error": failure.error}, {}, (), "FAILED")
    folder = ctx.scratch_dir("evaluation")
    for variant in scores.variants:
        evaluation, row = scores.evaluations[variant.name], scores.table[variant.name]
        png = folder / f"{variant.name}-confusion_matrix.png"
        figures = {"params": {"variant": variant.name, **{f"variant.{k}": v for k, v in variant.details.items()}},
                   "metrics": {**evaluation.figures(), "parameters": variant.parameters,
                               "nonzero_parameters": variant.nonzero_parameters,
                               "agreement_with_fp32": row.agreement_with_fp32}}
        ctx.defer(write_variant_run, ctx.ref, variant.name, figures, evaluation.confusion, evaluation.labels, png,
                  evaluation.split)
    ctx.defer(log_variant_comparison, ctx.run_id, scores.table.flat(), folder)
    for row in scores.table.rows:
        ctx.logger.info("variant %-10s F1 %.4f  %8d bytes  %7.3f ms @64  x%.2f speed  x%.2f smaller%s",
                        row.name, row.f1_macro, row.size_bytes, row.p50_ms_b64, row.speedup_b64_vs_fp32,
                        row.size_ratio_vs_fp32, f"  {IN_SAMPLE_NOTE}" if row.in_sample else "")


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="evaluate-variants", retries=0, timeout_seconds=3600, cache_policy=NO_CACHE)
def evaluate_task(ctx: RunContext, variants: Variants, splits: DataSplits, threads: int) -> Scores:
    """threads: ONNX Runtime's, as the service runs the model (serving.model_threads, 0: one per core).
    One thread also leaves the other core to the recorder without disturbing the timings."""
    return ctx.run_stage("evaluate", partial(evaluate_variants, variants, splits.x_val, splits.y_val, threads or None),
                         record_evaluation)
