"""Tuning efficiency: TPE + median pruning against random search without pruning, same budget.

One run, side by side, on real SQLite study storage (as the pipeline uses it), no MLflow:
  * per dataset and seed: best validation macro F1 (in points) and total epochs trained by each;
  * the final model's test F1 with the tuned hyperparameters against the untuned defaults;
  * wall time of the same study with n_jobs=2 against n_jobs=1 on this machine (median of 3 alternating runs).

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
    from tasks.train import TrainingSettings
    from tasks.tune import Objective, run_study

    started = time.perf_counter()
    result = run_study(Objective(prepared, TrainingSettings(config.model, config.train), tuning, seed), tuning, name, seed)
    return result, time.perf_counter() - started


def test_f1(prepared, model, train, seed: int, folder: Path) -> float:
    """Train with these settings, export, and score the bundle on the test split."""
    from tasks.evaluate import evaluate_bundle
    from tasks.export import write_bundle
    from tasks.train import TrainingSettings, train_on_data

    result = train_on_data(prepared, TrainingSettings(model, train), seed)
    bundle = write_bundle(folder / "bundle", result.network, result.spec, prepared)
    return evaluate_bundle(bundle, prepared.splits.x_test, prepared.splits.y_test).metrics["f1_macro"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--final-datasets", nargs="+", default=["breast_cancer", "digits", "wine"])
    parser.add_argument("--only-parallel", action="store_true",
                        help="re-measure the parallel section into the committed results")
    args = parser.parse_args()
    if args.only_parallel:
        import json

        from common import RESULTS_DIR
        from maas.config import load_config
        from tasks.data import prepare_data

        report = json.loads((RESULTS_DIR / "tuning_efficiency.json").read_text())
        with tempfile.TemporaryDirectory() as home:
            os.environ["MAAS_HOME"] = home
            report["parallel"] = {**parallel_trials(load_config, prepare_data), "measured_at": now()}
        write_results("tuning_efficiency", report, render)
        return

    import optuna

    from maas.config import load_config
    from tasks.data import prepare_data
    from tasks.train import TrainingSettings
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
            model, train = apply_hyperparameters(TrainingSettings(config.model, config.train), tuned.best_params)
            with tempfile.TemporaryDirectory() as scratch:
                untuned_f1 = test_f1(prepared, config.model, config.train, config.seed, Path(scratch))
            with tempfile.TemporaryDirectory() as scratch:
                best_trial_f1 = test_f1(prepared, model, train, config.seed, Path(scratch))
            # What the flow trains: the best trial's settings only past the tuning.min_gain_se guard.
            tuned_f1 = best_trial_f1 if tuned.use_tuned else untuned_f1
            report["final"][dataset] = {"tuned_test_f1": tuned_f1, "best_trial_test_f1": best_trial_f1,
                                        "untuned_test_f1": untuned_f1, "best_params": tuned.best_params,
                                        "used_tuned": tuned.use_tuned, "decision": tuned.decision}
            print(dataset, report["final"][dataset], flush=True)

        report["parallel"] = parallel_trials(load_config, prepare_data)

    write_results("tuning_efficiency", report, render)


def parallel_trials(load_config, prepare_data, repeats: int = 3) -> dict:
    """n_jobs=2 against n_jobs=1, alternating, `repeats` times each. Parallel studies sample other
    trials (the seed no longer fixes them), so epochs differ run to run: epochs/s is reported too."""
    config = load_config(dataset="breast_cancer")
    prepared = prepare_data(config.data, config.seed)
    runs = {1: [], 2: []}
    for repeat in range(repeats):
        for n_jobs in (1, 2):
            tuning = config.tuning.model_copy(update={"n_jobs": n_jobs})
            result, seconds = study(prepared, config, tuning, f"parallel-{n_jobs}-{repeat}", config.seed)
            runs[n_jobs].append({"seconds": seconds, "epochs": result.epochs_total})
    wall = {n: statistics.median(r["seconds"] for r in runs[n]) for n in runs}
    rate = {n: statistics.median(r["epochs"] / r["seconds"] for r in runs[n]) for n in runs}
    return {"dataset": "breast_cancer", "n_trials": config.tuning.n_trials, "repeats": repeats, "runs": runs,
            "n_jobs_1_s": wall[1], "n_jobs_2_s": wall[2], "speedup": wall[1] / wall[2],
            "epochs_per_s_ratio": rate[2] / rate[1]}


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
    lines += ["", "Final model, test macro F1: what the flow trains after tuning (the best trial's settings only when "
              "they beat the baseline trial by more than tuning.min_gain_se standard errors on validation), the best "
              "trial's settings regardless, and the untuned defaults:", "",
              "| dataset | flow (tuned) | best trial's settings | untuned | decision |", "|---|---|---|---|---|"]
    for dataset, f in report["final"].items():
        lines.append(f"| {dataset} | {f['tuned_test_f1']:.4f} | {f['best_trial_test_f1']:.4f} | {f['untuned_test_f1']:.4f} "
                     f"| {f['decision']} |")
    p = report["parallel"]
    lines += ["", f"Parallel trials ({p['dataset']}, {p['n_trials']} trials, median of {p.get('repeats', 1)} alternating "
              f"runs{', measured ' + p['measured_at'] if 'measured_at' in p else ''}): n_jobs=1 {p['n_jobs_1_s']:.1f} s, "
              f"n_jobs=2 {p['n_jobs_2_s']:.1f} s, wall-time speed-up {p['speedup']:.2f}x"
              + (f"; epochs per second {p['epochs_per_s_ratio']:.2f}x" if "epochs_per_s_ratio" in p else "") + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
