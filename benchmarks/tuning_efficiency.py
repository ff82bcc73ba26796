"""Tuning efficiency: TPE + median pruning against random search without pruning, same budget.

One run, side by side, on real SQLite study storage (as the pipeline uses it), no MLflow:
  * per dataset and seed: best validation macro F1 (in points) and total epochs trained by each;
  * the final model's test F1 with the tuned hyperparameters against the untuned defaults;
  * wall time of the same study with n_jobs=2 against n_jobs=1 on this machine.

Usage: python benchmarks/tuning_efficiency.py [--datasets digits breast_cancer] [--seeds 0 1 2]
Writes benchmarks/results/tuning_efficiency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, now, write_results


def study(prepared, config, tuning, name: str, seed: int):
    from tasks.tune import Objective, run_study

    started = time.perf_counter()
    result = run_study(Objective(prepared, config.model, config.train, tuning, seed), tuning, name, seed)
    return result, time.perf_counter() - started


def test_f1(prepared, model, train, seed: int, folder: Path) -> float:
    """Train with these settings, export, and score the bundle on the test split."""
    from tasks.evaluate import evaluate_bundle
    from tasks.export import write_bundle
    from tasks.train import train_on_data

    result = train_on_data(prepared, model, train, seed)
    bundle = write_bundle(folder / "bundle", result.network, result.spec, prepared.preprocessing,
                          prepared.labels, prepared.target, prepared.input_schema)
    return evaluate_bundle(bundle, prepared.splits.x_test, prepared.splits.y_test, folder).metrics["f1_macro"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--final-datasets", nargs="+", default=["breast_cancer", "digits", "wine"])
    args = parser.parse_args()

    import optuna

    from maas.config import load_config
    from tasks.data import prepare_data
    from tasks.tune import apply_hyperparameters

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = {"measured_at": now(), "machine": machine(),
              "comparison": {}, "final": {}, "parallel": {}}
    with tempfile.TemporaryDirectory() as home:
        os.environ["MAAS_HOME"] = home
        for dataset in args.datasets:
            rows = []
            for seed in args.seeds:
                config = load_config(dataset=dataset, overrides=[f"seed={seed}"])
                prepared = prepare_data(config.data, seed)
                tpe, tpe_s = study(prepared, config, config.tuning, f"{dataset}-tpe-{seed}", seed)
                random_tuning = config.tuning.model_copy(update={"sampler": "random", "pruner": "none"})
                rnd, rnd_s = study(prepared, config, random_tuning, f"{dataset}-random-{seed}", seed)
                rows.append({
                    "seed": seed,
                    "tpe_pruned": {"best_val_f1": tpe.best_values[0], "epochs": tpe.epochs_total, "pruned": tpe.n_pruned, "seconds": tpe_s},
                    "random": {"best_val_f1": rnd.best_values[0], "epochs": rnd.epochs_total, "seconds": rnd_s},
                })
                print(dataset, seed, rows[-1], flush=True)
            gap = statistics.median(100 * (r["random"]["best_val_f1"] - r["tpe_pruned"]["best_val_f1"]) for r in rows)
            epochs = statistics.median(r["tpe_pruned"]["epochs"] / r["random"]["epochs"] for r in rows)
            report["comparison"][dataset] = {"runs": rows, "median_gap_points": gap, "median_epoch_ratio": epochs,
                                             "n_trials": load_config().tuning.n_trials}

        for dataset in args.final_datasets:
            config = load_config(dataset=dataset)
            prepared = prepare_data(config.data, config.seed)
            tuned, _ = study(prepared, config, config.tuning, f"{dataset}-final", config.seed)
            model, train = apply_hyperparameters(config.model, config.train, tuned.best_params)
            with tempfile.TemporaryDirectory() as scratch:
                untuned_f1 = test_f1(prepared, config.model, config.train, config.seed, Path(scratch))
            with tempfile.TemporaryDirectory() as scratch:
                tuned_f1 = test_f1(prepared, model, train, config.seed, Path(scratch))
            report["final"][dataset] = {"tuned_test_f1": tuned_f1, "untuned_test_f1": untuned_f1, "best_params": tuned.best_params}
            print(dataset, report["final"][dataset], flush=True)

        config = load_config(dataset="breast_cancer")
        prepared = prepare_data(config.data, config.seed)
        walls = {}
        for n_jobs in (1, 2):
            tuning = config.tuning.model_copy(update={"n_jobs": n_jobs})
            _, walls[n_jobs] = study(prepared, config, tuning, f"parallel-{n_jobs}", config.seed)
        report["parallel"] = {"dataset": "breast_cancer", "n_trials": config.tuning.n_trials,
                              "n_jobs_1_s": walls[1], "n_jobs_2_s": walls[2], "speedup": walls[1] / walls[2]}

    write_results("tuning_efficiency", report, render)


def render(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Tuning efficiency", "",
        f"Measured {report['measured_at']} on {m['cpu']}, {m['cores']} cores; torch {m['torch']}. "
        "Default tuning config (20 trials, TPE + median pruner) against random search without pruning, "
        "same number of trials, same seeds, SQLite study storage.", "",
        "| dataset | seed | TPE+pruner best val F1 | random best val F1 | TPE+pruner epochs | random epochs | pruned | TPE s | random s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, c in report["comparison"].items():
        for r in c["runs"]:
            t, q = r["tpe_pruned"], r["random"]
            lines.append(f"| {dataset} | {r['seed']} | {100 * t['best_val_f1']:.2f} | {100 * q['best_val_f1']:.2f} | "
                         f"{t['epochs']} | {q['epochs']} | {t['pruned']} | {t['seconds']:.1f} | {q['seconds']:.1f} |")
    lines += ["", "| dataset | median gap (random - TPE), points | median epochs TPE / random |", "|---|---|---|"]
    for dataset, c in report["comparison"].items():
        lines.append(f"| {dataset} | {c['median_gap_points']:+.2f} | {c['median_epoch_ratio']:.2f} |")
    lines += ["", "Final model, test macro F1 (tuned hyperparameters vs the untuned defaults):", "",
              "| dataset | tuned | untuned |", "|---|---|---|"]
    for dataset, f in report["final"].items():
        lines.append(f"| {dataset} | {f['tuned_test_f1']:.4f} | {f['untuned_test_f1']:.4f} |")
    p = report["parallel"]
    lines += ["", f"Parallel trials ({p['dataset']}, {p['n_trials']} trials): n_jobs=1 {p['n_jobs_1_s']:.1f} s, "
              f"n_jobs=2 {p['n_jobs_2_s']:.1f} s, speed-up {p['speedup']:.2f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
