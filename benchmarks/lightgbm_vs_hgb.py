"""Does LightGBM earn a place beside scikit-learn's HistGradientBoosting (`hgb`)? The two are the same
kind of model (histogram gradient boosting, leaf-wise trees), so LightGBM would be worth its
dependency and its ONNX converter only if it scored higher or fitted faster on the tables the
selection benchmark uses.

Side by side on each table, on the comparison's own folds (train + validation, repeated stratified
k-fold as `maas run` makes them): hgb tuned as `maas run` tunes it (tasks.families.tune_classic:
its defaults first, then TPE, selection.family_trials trials, selection.time_budget_s), and
LightGBM by a study of the same trials and budget over the same kind of settings (its defaults
first). Both answer by argmax and fit on one thread below 20,000 rows, as the pipeline does. Then
each tuned model, fitted on train + validation, is read once on the test split.

Run: .venv/bin/python benchmarks/lightgbm_vs_hgb.py [dataset ...]   (writes results/lightgbm_vs_hgb.*)
LightGBM is not a dependency of maas: `make bench` installs it into .bench-lightgbm
(benchmarks/requirements-lightgbm.txt), which this script puts on its path.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / ".bench-lightgbm"))

import models  # noqa: E402,F401 - ours, before onnxruntime.quantization puts its own `models` on sys.path

from benchmarks.common import machine, measured_on, now, write_results  # noqa: E402
from benchmarks.model_selection import BUILTINS, OWN, table_config  # noqa: E402

SMALL_TABLE_ROWS = 20_000  # below it one thread a fit, as models.classic.fit_classic does for hgb
LIGHTGBM_DEFAULTS = {"learning_rate": 0.1, "num_leaves": 31, "min_child_samples": 20, "reg_lambda": 1e-4,
                     "n_estimators": 100}  # LightGBM's own, reg_lambda at the range's floor (its default is 0)


def suggest_lightgbm(trial) -> dict:
    """The space tasks.families.suggest_classic searches for hgb, in LightGBM's names."""
    return {"learning_rate": trial.suggest_float("learning_rate", 0.02, 0.3, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 7, 63, log=True),
            "min_child_samples": trial.suggest_int("min_child_samples", 3, 60, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 1e-4, 10.0, log=True),
            "n_estimators": trial.suggest_int("n_estimators", 50, 400, log=True)}


def fit_lightgbm(params: dict, x, y, seed: int):
    import warnings

    from lightgbm import LGBMClassifier

    threads = 1 if len(x) < SMALL_TABLE_ROWS else os.cpu_count()
    with warnings.catch_warnings():  # "X does not have valid feature names": it is fitted on arrays
        warnings.simplefilter("ignore", UserWarning)
        return LGBMClassifier(random_state=seed, n_jobs=threads, verbose=-1, **params).fit(x, y)


def predict_lightgbm(model, x):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.predict_proba(x)


def tune_lightgbm(folds, config, deadline: float) -> tuple[dict, list[float], float, float]:
    """The best settings, their fold scores, the mean seconds a fold's fit took, and the defaults' CV mean."""
    import numpy as np
    import optuna

    from tasks.families import macro_f1

    runs: dict[int, tuple[list[float], float]] = {}

    def objective(trial) -> float:
        params = suggest_lightgbm(trial)
        scores, seconds = [], []
        for train_rows, out_rows in folds.splits:
            started = time.perf_counter()
            model = fit_lightgbm(params, folds.x[train_rows], folds.y[train_rows], config.seed)
            seconds.append(time.perf_counter() - started)
            scores.append(macro_f1(folds.y[out_rows], predict_lightgbm(model, folds.x[out_rows])))
        runs[trial.number] = (scores, float(np.mean(seconds)))
        return float(np.mean(scores))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    study.enqueue_trial(LIGHTGBM_DEFAULTS)
    study.optimize(objective, n_trials=config.selection.family_trials,
                   timeout=max(1.0, (deadline - time.perf_counter()) * 0.7))
    scores, seconds = runs[study.best_trial.number]
    return dict(study.best_trial.params), scores, seconds, float(np.mean(runs[0][0]))


def measure(name: str, scratch: Path) -> dict:
    from functools import partial

    import numpy as np

    from maas.bundle import transform
    from models.classic import ClassicSpec, fit_classic
    from tasks.data import prepare_data
    from tasks.evaluate import classification_metrics
    from tasks.families import (CLASSIC_DEFAULTS, cross_validate, fit_classic_fold, make_folds, selection_rows,
                                tune_classic)

    config = table_config(name, scratch)
    prepared = prepare_data(config.data, config.seed)
    folds = make_folds(prepared.sealed(), config.selection, config.seed)
    n_classes = len(prepared.labels)

    started = time.perf_counter()
    hgb = tune_classic("hgb", folds, config, f"lgbm-bench-{name}-{int(time.time())}", prepared.fingerprint,
                       started + config.selection.time_budget_s)
    hgb_s = time.perf_counter() - started
    started = time.perf_counter()
    lgbm_params, lgbm_scores, lgbm_fold_s, lgbm_default_cv = tune_lightgbm(
        folds, config, started + config.selection.time_budget_s)
    lgbm_s = time.perf_counter() - started

    hgb_default_cv = float(np.mean(cross_validate(partial(fit_classic_fold, seed=config.seed),
                                                  ClassicSpec("hgb", folds.x.shape[1], n_classes, CLASSIC_DEFAULTS["hgb"]),
                                                  folds, folds.splits, float("inf")).scores))
    hgb_scores = hgb.validation.scores  # a new study: its best trial ran in this process
    x, y = selection_rows(prepared)
    test_x, test_y = transform(prepared.splits.x_test, prepared.preprocessing), prepared.splits.y_test
    hgb_test = fit_classic(ClassicSpec("hgb", x.shape[1], n_classes, hgb.params), x, y, config.seed).predict_proba(test_x)
    lgbm_test = predict_lightgbm(fit_lightgbm(lgbm_params, x, y, config.seed), test_x)
    f1 = lambda found: classification_metrics(test_y, found)["f1_macro"]  # noqa: E731
    return {
        "dataset": name, "rows": prepared.n_rows, "compared_rows": len(folds.y), "folds": len(folds.splits),
        "hgb": {"cv_mean": float(np.mean(hgb_scores)), "cv_sd": float(np.std(hgb_scores, ddof=1)),
                "default_cv_mean": hgb_default_cv, "fold_fit_s": hgb.validation.fit_seconds,
                "study_s": hgb_s, "trials": hgb.trials, "params": hgb.params, "test_f1": f1(hgb_test),
                "fold_f1": hgb_scores},
        "lightgbm": {"cv_mean": float(np.mean(lgbm_scores)), "cv_sd": float(np.std(lgbm_scores, ddof=1)),
                     "default_cv_mean": lgbm_default_cv, "fold_fit_s": lgbm_fold_s, "study_s": lgbm_s,
                     "params": lgbm_params, "test_f1": f1(lgbm_test), "fold_f1": lgbm_scores},
        "paired_se": float(np.std(np.subtract(lgbm_scores, hgb_scores), ddof=1) / np.sqrt(len(hgb_scores))),
    }


def render(report: dict) -> str:
    lines = ["# LightGBM against scikit-learn's HistGradientBoosting", "", measured_on(report), "",
             f"LightGBM {report['lightgbm_version']}. Each tuned as `maas run` tunes hgb (defaults first, then TPE; "
             "the same trials, budget and search space) on the comparison's folds of train + validation; argmax "
             "answers. 'paired SE': the standard error of the fold-by-fold difference. Test F1: each tuned model "
             "fitted on train + validation, read once.", "",
             "| dataset | rows | folds | hgb CV F1 | LightGBM CV F1 | difference (paired SE) | defaults: hgb / LightGBM | "
             "fit s a fold: hgb / LightGBM | study s: hgb / LightGBM | test F1: hgb / LightGBM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["datasets"]:
        hgb, lgbm = row["hgb"], row["lightgbm"]
        lines.append(
            f"| {row['dataset']} | {row['rows']} | {row['folds']} | {hgb['cv_mean']:.4f} ± {hgb['cv_sd']:.4f} | "
            f"{lgbm['cv_mean']:.4f} ± {lgbm['cv_sd']:.4f} | {lgbm['cv_mean'] - hgb['cv_mean']:+.4f} ({row['paired_se']:.4f}) | "
            f"{hgb['default_cv_mean']:.4f} / {lgbm['default_cv_mean']:.4f} | {hgb['fold_fit_s']:.2f} / {lgbm['fold_fit_s']:.2f} | "
            f"{hgb['study_s']:.0f} / {lgbm['study_s']:.0f} | {hgb['test_f1']:.4f} / {lgbm['test_f1']:.4f} |")
    rows = report["datasets"]
    gains = [row["lightgbm"]["cv_mean"] - row["hgb"]["cv_mean"] for row in rows]
    speed = [row["hgb"]["fold_fit_s"] / row["lightgbm"]["fold_fit_s"] for row in rows]
    within = sum(abs(gain) <= 2 * row["paired_se"] for gain, row in zip(gains, rows))
    faster = sum(ratio > 1 for ratio in speed)
    lines += ["", f"Mean CV difference (LightGBM - hgb): {sum(gains) / len(gains):+.4f}; largest {max(gains):+.4f}, "
              f"smallest {min(gains):+.4f}; within two paired SE on {within} of {len(rows)} tables. Fit time a fold, "
              f"hgb / LightGBM: {min(speed):.2f}x to {max(speed):.2f}x; LightGBM faster on {faster} of {len(rows)}.", ""]
    return "\n".join(lines)


def main(names: list[str]) -> None:
    from importlib import metadata

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MAAS_HOME"] = str(Path(scratch) / "home")
        report = {"measured_at": now(), "machine": machine(), "lightgbm_version": metadata.version("lightgbm"),
                  "datasets": []}
        for name in names or [*BUILTINS, *OWN]:
            report["datasets"].append(measure(name, Path(scratch)))
            row = report["datasets"][-1]
            print(f"{name}: hgb {row['hgb']['cv_mean']:.4f}, LightGBM {row['lightgbm']['cv_mean']:.4f}", flush=True)
    write_results("lightgbm_vs_hgb", report, render)


if __name__ == "__main__":
    main(sys.argv[1:])
