"""The figures a training run records (confusion matrices, quality against latency, Optuna's study
plots), and the jobs that draw and log them.

Kept apart from the stages so the recorder process (maas/recorder.py) can draw them importing
matplotlib and Optuna only, not torch or Prefect: every job the pipeline defers lives in a module as
light as this one (here, maas/run_context.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from maas.run_context import RunRef, write_child_run


def warm_up() -> None:
    """Import what drawing needs, ahead of the first figure (the recorder does this while the study runs)."""
    import optuna.visualization.matplotlib  # noqa: F401
    import pandas  # noqa: F401

    _pyplot()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(confusion: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """Counts per (true, predicted) label as a PNG a person can read at a glance."""
    plt = _pyplot()
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


def plot_quality_vs_latency(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Macro F1 against batch-64 latency per variant (flat rows: VariantRow.flat); marker area follows size."""
    plt = _pyplot()
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


def save_study_plots(study, objectives: list[str], folder: Path) -> list[Path]:
    """Optuna's optimization history, parameter importances and parallel coordinates as PNGs."""
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    plt = _pyplot()
    target = None if len(objectives) == 1 else (lambda t: t.values[0])
    # PED-ANOVA: 10 ms here where the default fANOVA (a random forest, sklearn imported) took over a second.
    importance = optuna.importance.PedAnovaImportanceEvaluator()
    plots = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study, target=target, target_name="val f1_macro"),
        "param_importances.png": lambda: optuna_plots.plot_param_importances(study, evaluator=importance, target=target,
                                                                             target_name="val f1_macro"),
        "parallel_coordinate.png": lambda: optuna_plots.plot_parallel_coordinate(study, target=target, target_name="val f1_macro"),
    }
    saved = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # a parameter every trial gave the same value (a sample-limited or short study): matplotlib widens the axis
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims")
        # PED-ANOVA when the best trials and the rest hold the same trials (all scored alike): the
        # importances come out equal, which the plot shows
        warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")
        for name, draw in plots.items():
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances need 2+ trials
                continue
            figure = axes.figure if hasattr(axes, "figure") else np.ravel(axes)[0].figure
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            figure.savefig(folder / name, dpi=100)
            plt.close(figure)
            saved.append(folder / name)
    return saved


# --- jobs (maas/recorder.py): draw, then log to a run --------------------------------------------


def log_confusion_matrix(client, run_id: str, confusion: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    client.log_artifact(run_id, str(plot_confusion_matrix(confusion, labels, path, title)), artifact_path="evaluation")


def log_variant_comparison(client, run_id: str, rows: list[dict[str, Any]], folder: Path) -> None:
    """variants/quality_vs_latency.png and variants/comparison.json on the parent run."""
    import pandas as pd

    plot = plot_quality_vs_latency(rows, folder / "quality_vs_latency.png", "variants on the validation split")
    client.log_artifact(run_id, str(plot), artifact_path="variants")
    with warnings.catch_warnings():  # MLflow's own select_dtypes call warns under pandas 3
        warnings.filterwarnings("ignore", message=".*select_dtypes.*")
        client.log_table(run_id, pd.DataFrame(rows), "variants/comparison.json")


def log_leaderboard(client, run_id: str, rows: list[dict[str, Any]], folder: Path) -> None:
    """families/leaderboard.png (CV macro F1 mean ± sd per family) and families/leaderboard.json."""
    import pandas as pd

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 0.6 * len(rows) + 1.5))
    names = [row["family"] + (" (selected)" if row["selected"] else "") for row in rows][::-1]
    axes.barh(names, [row["cv_f1_macro_mean"] for row in rows][::-1], xerr=[row["cv_f1_macro_sd"] for row in rows][::-1],
              color=["tab:green" if row["selected"] else "tab:gray" for row in rows][::-1])
    low = min(row["cv_f1_macro_mean"] - row["cv_f1_macro_sd"] for row in rows)
    axes.set_xlim(max(0.0, low - 0.05), 1.0)
    axes.set_xlabel("cross-validated macro F1 (mean ± sd over folds)")
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    figure.savefig(folder / "leaderboard.png", dpi=100)
    plt.close(figure)
    client.log_artifact(run_id, str(folder / "leaderboard.png"), artifact_path="families")
    with warnings.catch_warnings():  # MLflow's own select_dtypes call warns under pandas 3
        warnings.filterwarnings("ignore", message=".*select_dtypes.*")
        client.log_table(run_id, pd.DataFrame(rows), "families/leaderboard.json")


# The split name of validation figures of a model fitted on those rows (a scikit-learn family's final
# fit on train + validation): in MLflow as `val_in_sample/f1_macro`, never beside a network's `val/`.
IN_SAMPLE = "val_in_sample"
SPLIT_WORDS = {"test": "the test split", "val": "the validation split", IN_SAMPLE: "the validation split, in-sample"}


def write_variant_run(client, parent: RunRef, name: str, figures: dict[str, Any], confusion: np.ndarray,
                      labels: list[str], png: Path, split: str = "val") -> None:
    """A variant's child run with its figures and confusion matrix (`split`: the prefix of its metrics)."""
    title = f"{name} on {SPLIT_WORDS[split]}: accuracy {figures['metrics'][f'{split}/accuracy']:.3f}"
    plot_confusion_matrix(confusion, labels, png, title)
    write_child_run(client, parent, f"variant-{name}", {"maas.variant": name}, figures, [(png, "evaluation")])


def log_study_plots(client, run_id: str, storage_url: str, study_name: str, objectives: list[str], folder: Path) -> None:
    """The study's plots under tuning/ (the study is read back from its storage)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage_url)
    for path in save_study_plots(study, objectives, folder):
        client.log_artifact(run_id, str(path), artifact_path="tuning")
