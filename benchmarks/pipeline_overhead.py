"""Orchestration + tracking overhead of the training flow, against the same stages as plain calls.

One process, side by side, per dataset at the default config (tuning included), in alternating
pairs so that the machine's drift hits both sides alike:
  plain   the stage functions called directly: prepare_data, tune, compare_families, train_on_data
          and build_variants (or fit_chosen_family), evaluate_variants, choose_winner, report_on_test
          (Optuna studies on SQLite; no Prefect, no MLflow)
  flow    the Prefect flow with MLflow tracking, registry and packaging, warm (not the first run
          in the process)
plus the first flow run in the process (cold) and the start of Prefect's temporary server, which
`maas run` pays once per command. Each run tunes a fresh study with the same seed, so all do the
same trials (n_jobs=1). Overhead = flow wall - plain wall (median of the pairs); the flow's own
stage timer says where it goes (compute vs record per stage).

Usage: python benchmarks/pipeline_overhead.py [--datasets breast_cancer digits wine] [--pairs 3]
Writes benchmarks/results/pipeline_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, measured_on, now, write_results


def plain_pipeline(config, scratch: Path) -> float:
    """The flow's stages as plain function calls: no orchestration, no tracking, no registry. The
    same path as the flow: tuning and the families' comparison on the sealed data, then the chosen
    network trained and compressed (or the chosen scikit-learn family fitted), every variant scored on
    validation, the winner chosen and reported once on the test split."""
    from tasks.compress import build_variants
    from tasks.data import prepare_data
    from tasks.evaluate import evaluate_variants
    from tasks.families import compare_families, fit_chosen_family, tunes_network
    from tasks.registry import choose_winner, report_on_test
    from tasks.train import TrainingSettings, train_on_data
    from tasks.tune import chosen_settings, tune

    started = time.perf_counter()
    prepared = prepare_data(config.data, config.seed)
    choosing = prepared.sealed()
    tuning = tune(choosing, TrainingSettings(config.model, config.train), config.tuning, config.seed,
                  config.tuning.study_name) if tunes_network(config) else None
    settings = chosen_settings(config, tuning)
    comparison = compare_families(choosing, config, settings, config.tuning.study_name)
    if comparison.is_network:
        trained = train_on_data(choosing, settings, config.seed)
        variants = build_variants(trained, choosing, config.compression, settings.train, config.seed, scratch)
    else:
        variants = fit_chosen_family(choosing, comparison, config.seed, scratch)
    threads = config.serving.model_threads or None
    scores = evaluate_variants(variants, choosing.splits.x_val, choosing.splits.y_val, threads)
    report_on_test(choose_winner(scores, config.selection), prepared.splits, comparison, threads)
    return time.perf_counter() - started


def flow_once(config) -> dict:
    from flows.train_pipeline import train_pipeline

    started = time.perf_counter()
    summary = train_pipeline(config)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "compute_s": summary.stage_seconds, "record_s": summary.record_seconds,
            "test_f1_macro": summary.registered.test_metrics["f1_macro"]}


def measure(dataset: str, pairs: int) -> dict:
    from maas.config import load_config

    def fresh(name: str):
        return load_config(dataset=dataset, overrides=[f"tuning.study_name=bench-{name}-{dataset}"])

    cold = flow_once(fresh("cold"))
    plain, flows = [], []
    for index in range(pairs):
        with tempfile.TemporaryDirectory() as scratch:
            plain.append(plain_pipeline(fresh(f"plain-{index}"), Path(scratch)))
        flows.append(flow_once(fresh(f"flow-{index}")))
    plain_s = statistics.median(plain)
    median_flow = sorted(flows, key=lambda run: run["wall_s"])[len(flows) // 2]
    flow_s = median_flow["wall_s"]
    return {"plain_s": plain, "flow_s": [run["wall_s"] for run in flows], "plain_median_s": plain_s,
            "flow_median_s": flow_s, "overhead_s": flow_s - plain_s, "flow_vs_plain": flow_s / plain_s,
            "flow": median_flow, "flow_cold": cold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits", "wine"])
    parser.add_argument("--pairs", type=int, default=3, help="alternating plain / flow pairs per dataset")
    parser.add_argument("--render", action="store_true", help="only re-render the committed results")
    args = parser.parse_args()
    if args.render:
        import json

        from common import RESULTS_DIR

        write_results("pipeline_overhead", json.loads((RESULTS_DIR / "pipeline_overhead.json").read_text()), render)
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from maas.cli import quiet_defaults

    quiet_defaults()  # as `maas run` runs

    with tempfile.TemporaryDirectory() as home:
        os.environ["MAAS_HOME"] = home
        os.environ["BENTOML_HOME"] = str(Path(home) / "bentoml")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ["PREFECT_HOME"] = str(Path(home) / "prefect")

        import_started = time.perf_counter()
        import optuna
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, temporary_settings

        import flows.train_pipeline  # noqa: F401  (the import cost a `maas run` pays)
        import_s = time.perf_counter() - import_started
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        # The same temporary server Prefect starts when no PREFECT_API_URL is set, timed apart.
        server_started = time.perf_counter()
        server = SubprocessASGIServer()
        server.start(timeout=180)
        server_start_s = time.perf_counter() - server_started
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                results = {dataset: measure(dataset, args.pairs) for dataset in args.datasets}
        finally:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all()  # send buffered flow logs before their server goes away
            server.stop()

    report = {"measured_at": now(), "machine": machine(), "pairs": args.pairs, "import_s": import_s,
              "prefect_temporary_server_start_s": server_start_s, "datasets": results}
    write_results("pipeline_overhead", report, render)


SHARED_STAGES = ("data", "tune", "compare", "train", "compress", "evaluate", "select", "report")  # what the plain run also computes


def accounted(run: dict) -> tuple[float, float]:
    """(the flow run's own non-shared seconds, its wall / its shared compute): measured inside one run,
    so the machine's drift between runs, seconds here, does not enter."""
    shared = sum(run["compute_s"].get(stage, 0.0) for stage in SHARED_STAGES)
    return run["wall_s"] - shared, run["wall_s"] / shared


def render(report: dict) -> str:
    lines = [
        "# Pipeline overhead",
        "",
        measured_on(report) + f" Default config, one process, medians of {report['pairs']} alternating "
        "plain / flow pairs (targets: flow / plain <= 1.10x, overhead <= 2.5 s).",
        "",
        "Accounted: within the median flow run, its wall time minus the compute of the stages the plain run "
        "also does (the rest is Prefect, recording, the registry and, on promotion, the Bento build). Wall "
        "to wall: against the plain runs' median, which the machine's drift moves by seconds between runs.",
        "",
        "| dataset | plain stages s | flow wall s | accounted overhead s | accounted flow / compute | wall overhead s "
        "| wall flow / plain | cold flow wall s | test F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["datasets"].items():
        extra, ratio = accounted(r["flow"])
        lines.append(f"| {name} | {r['plain_median_s']:.2f} | {r['flow_median_s']:.2f} | {extra:.2f} | {ratio:.3f}x | "
                     f"{r['overhead_s']:.2f} | {r['flow_vs_plain']:.3f}x | {r['flow_cold']['wall_s']:.2f} | "
                     f"{r['flow']['test_f1_macro']:.4f} |")
    lines += ["", "Per stage, the median flow run as its stage timer saw it: compute is the stage's own work "
              "(what the plain run also does), record is writing its result to MLflow and Prefect:", "",
              "| dataset | stage | compute s | record s |", "|---|---|---|---|"]
    for name, r in report["datasets"].items():
        compute, record = r["flow"]["compute_s"], r["flow"]["record_s"]
        for stage in dict.fromkeys([*compute, *record]):
            lines.append(f"| {name} | {stage} | {compute.get(stage, 0):.3f} | {record.get(stage, 0):.3f} |")
        rest = r["flow_median_s"] - sum(compute.values()) - sum(record.values())
        lines.append(f"| {name} | (Prefect task and flow runs, the run's set-up) | | {rest:.3f} |")
    lines += [
        "",
        "All runs: " + "; ".join(f"{name} plain {', '.join(f'{s:.1f}' for s in r['plain_s'])} s, flow "
                                 f"{', '.join(f'{s:.1f}' for s in r['flow_s'])} s" for name, r in report["datasets"].items()),
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
