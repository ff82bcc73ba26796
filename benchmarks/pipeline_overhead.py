"""Orchestration + tracking overhead of the training flow, against the same stages as plain calls.

One process, side by side, for each built-in dataset at the default config (tuning included):
  plain     the same stages as plain function calls (Optuna study on SQLite, no Prefect, no MLflow)
  flow      the Prefect flow with MLflow tracking and registry, warm (second run in the process)
  flow_cold the first flow run in the process (MLflow store creation, first-use costs)
plus the start of Prefect's temporary server, which `maas run` pays once per command.
Each run tunes a fresh study with the same seed, so all three do the same trials (n_jobs=1).

Overhead = flow wall time - plain wall time: Prefect task and flow runs, MLflow parent and child
runs, metrics, artifacts, model logging and registration.

Usage: python benchmarks/pipeline_overhead.py [--datasets breast_cancer digits wine]
Writes benchmarks/results/pipeline_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import machine, measured_on, now, write_results

STAGE_OF_TASK = {"prepare_data": "data", "evaluate_variants": "evaluate", "register_model": "register"}



def plain_pipeline(config, scratch: Path) -> float:
    """The same stages as the flow, as plain function calls: no orchestration, no tracking."""
    from tasks.compress import build_variants
    from tasks.data import prepare_data
    from tasks.evaluate import evaluate_bundle, variant_row
    from tasks.registry import select_variant
    from tasks.train import train_on_data, training_arrays
    from tasks.tune import Objective, apply_hyperparameters, run_study

    started = time.perf_counter()
    prepared = prepare_data(config.data, config.seed)
    tuned = run_study(Objective(prepared, config.model, config.train, config.tuning, config.seed),
                      config.tuning, config.tuning.study_name, config.seed)
    model, train = apply_hyperparameters(config.model, config.train, tuned.best_params)
    arrays = training_arrays(prepared)
    result = train_on_data(prepared, model, train, config.seed, arrays=arrays)
    variants, _ = build_variants(result, prepared, arrays, config.compression, train, config.seed, scratch)
    rows, reference = [], None
    for variant in variants:
        evaluation = evaluate_bundle(variant.bundle_dir, prepared.splits.x_test, prepared.splits.y_test,
                                     variant.bundle_dir)
        reference = reference or evaluation
        rows.append(variant_row(variant, evaluation, reference))
    select_variant(rows, config.selection)
    return time.perf_counter() - started


def task_walls(api_url: str, flow_run_id: str) -> dict[str, float]:
    """Wall seconds of each task run, as Prefect recorded them."""
    import httpx

    runs = httpx.post(f"{api_url}/task_runs/filter",
                      json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 50}).raise_for_status().json()
    return {run["task_key"].rsplit("-", 1)[0].replace("_task", ""): run["total_run_time"] for run in runs}


def flow_once(config, api_url: str, plain_s: float) -> dict:
    from flows.train_pipeline import train_pipeline

    started = time.perf_counter()
    summary = train_pipeline(config)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "overhead_s": wall - plain_s,
        "overhead_fraction": (wall - plain_s) / wall,
        "stage_compute_s": summary["stage_seconds"],
        "task_wall_s": task_walls(api_url, summary["prefect_flow_run_id"]),
        "test_f1_macro": summary["test_metrics"]["f1_macro"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits", "wine"])
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    with tempfile.TemporaryDirectory() as home:
        os.environ["MAAS_HOME"] = home
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ["PREFECT_HOME"] = str(Path(home) / "prefect")

        import_started = time.perf_counter()
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, temporary_settings

        import flows.train_pipeline  # noqa: F401  (the import cost a `maas run` pays)
        from maas.config import load_config
        import_s = time.perf_counter() - import_started

        # The same temporary server Prefect starts when no PREFECT_API_URL is set, timed apart.
        server_started = time.perf_counter()
        server = SubprocessASGIServer()
        server.start(timeout=180)
        server_start_s = time.perf_counter() - server_started
        results = {}
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                for dataset in args.datasets:
                    def fresh(name: str):
                        return load_config(dataset=dataset, overrides=[f"tuning.study_name=bench-{name}-{dataset}"])

                    with tempfile.TemporaryDirectory() as scratch:
                        plain_s = plain_pipeline(fresh("plain"), Path(scratch))
                    cold = flow_once(fresh("cold"), server.api_url, plain_s)
                    warm = flow_once(fresh("warm"), server.api_url, plain_s)
                    results[dataset] = {"plain_s": plain_s, "flow": warm, "flow_cold": cold,
                                        "flow_vs_plain": warm["wall_s"] / plain_s}
        finally:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all()  # send buffered flow logs before their server goes away
            server.stop()

    report = {
        "measured_at": now(),
        "machine": machine(),
        "import_s": import_s,
        "prefect_temporary_server_start_s": server_start_s,
        "datasets": results,
    }
    write_results("pipeline_overhead", report, render)


def render(report: dict) -> str:
    lines = [
        "# Pipeline overhead",
        "",
        measured_on(report) + " Default config, one process.",
        "",
        "| dataset | plain stages s | flow wall s | overhead s | overhead % | flow / plain | cold flow wall s | cold overhead % | test F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["datasets"].items():
        warm, cold = r["flow"], r["flow_cold"]
        lines.append(
            f"| {name} | {r['plain_s']:.2f} | {warm['wall_s']:.2f} | "
            f"{warm['overhead_s']:.2f} | {100 * warm['overhead_fraction']:.1f} | {r['flow_vs_plain']:.2f}x | "
            f"{cold['wall_s']:.2f} | {100 * cold['overhead_fraction']:.1f} | {warm['test_f1_macro']:.4f} |"
        )
    lines += ["", "Per stage, warm flow run (task wall as Prefect recorded it; compute as timed inside the "
              "task, which for tune includes its MLflow child runs):", ""]
    lines += ["| dataset | stage | task wall s | compute s |", "|---|---|---|---|"]
    for name, r in report["datasets"].items():
        for stage, wall in sorted(r["flow"]["task_wall_s"].items()):
            compute = r["flow"]["stage_compute_s"].get(STAGE_OF_TASK.get(stage, stage))
            lines.append(f"| {name} | {stage} | {wall:.3f} | {'' if compute is None else f'{compute:.3f}'} |")
    lines += [
        "",
        f"Once per `maas run` command, outside the flow: imports {report['import_s']:.1f} s, and Prefect's "
        f"temporary server start {report['prefect_temporary_server_start_s']:.1f} s (no PREFECT_API_URL set).",
        "Users avoid the server start by running one server (`prefect server start`) and setting "
        "`PREFECT_API_URL=http://127.0.0.1:4200/api`; scheduled runs through a deployment never pay it.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
