"""Cost of one monitoring check over a large prediction log, one run:

  check      one full `maas monitor` check (the Prefect flow): resolve the champion, read 100k
             logged predictions, drift of 30 features, live quality against 100k labels, the
             rollback comparison, the MLflow run with its report and plots (target: < 30 s)
  stages     the same work without orchestration and reporting, stage by stage
  evidently  Evidently's DataDriftPreset on the same rows, as a DataFrame (no log parsing, no
             labels), run in its own environment (.bench-venv: `make bench` creates it)

The log holds 100k one-row requests (the costliest shape to parse) of breast_cancer rows drawn with
replacement plus noise, three features shifted by one standard deviation in the second half.

Usage: python benchmarks/monitoring.py [--rows 100000]
Writes benchmarks/results/monitoring.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import machine, measured_on, now, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIFTED = ("mean radius", "mean texture", "worst area")
EVIDENTLY_PYTHON = ROOT / ".bench-venv" / "bin" / "python"


def logged_rows(prepared, n_rows: int, seed: int = 0):
    """Production-like rows: training rows drawn with replacement, 2% noise, half of them shifted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    source = prepared.splits.x_train
    rows = source.iloc[rng.integers(0, len(source), n_rows)].reset_index(drop=True)
    rows = rows * (1 + rng.normal(0, 0.02, rows.shape))
    for column in SHIFTED:
        rows.loc[n_rows // 2:, column] += source[column].std()
    return rows


def fill_log(connection, bundle, rows, model_label: str, home: Path):
    """Log the rows as the service does (one request each) and write their ground truth."""
    import pandas as pd

    from maas.service_store import log_predictions

    predicted = bundle.predict(rows)["label"].to_numpy()
    ids = [uuid.uuid4().hex for _ in range(len(rows))]
    now_s = time.time()
    records = rows.to_dict(orient="records")
    entries = [(request_id, now_s, "bench", model_label, 200, json.dumps({"rows": [record]}),
                json.dumps([{"label": label, "probabilities": {}}]))
               for request_id, record, label in zip(ids, records, predicted)]
    log_predictions(connection, entries)
    labels_path = home / "labels.parquet"
    pd.DataFrame({"request_id": ids, "label": predicted}).to_parquet(labels_path)
    return labels_path


def time_stages(connection, watched, config, labels_path) -> dict:
    from tasks.drift import measure_drift
    from tasks.prediction_log import read_ground_truth, read_logged_rows, with_ground_truth
    from tasks.quality import live_quality

    seconds = {}
    started = time.perf_counter()
    logged = read_logged_rows(connection, watched.ref.name, 0, time.time())
    seconds["read_log"] = time.perf_counter() - started
    started = time.perf_counter()
    drift = measure_drift(logged.inputs, logged.meta["predicted"], watched.reference, config.monitoring.drift)
    seconds["drift"] = time.perf_counter() - started
    started = time.perf_counter()
    labelled = with_ground_truth(logged, read_ground_truth(labels_path))
    live_quality(labelled, watched.ref.version, watched.bundle.labels, {}, config.monitoring)
    seconds["labels_and_quality"] = time.perf_counter() - started
    return {"seconds": seconds, "drifted": sorted(drift.drifted_features), "n_rows": drift.n_rows}, logged


def detection_cases(config, scratch: Path, seeds=range(10)) -> dict:
    """The issue's scenario per seed: breast_cancer's test split as logged, unshifted and with three
    features shifted by one standard deviation; ours judged here, the files left for Evidently."""
    import numpy as np
    import pandas as pd

    from tasks.data import prepare_data
    from tasks.drift import build_reference, measure_drift

    cases = {}
    for seed in seeds:
        prepared = prepare_data(config.data.model_copy(), seed)
        x_train, x_test = prepared.splits.x_train, prepared.splits.x_test
        reference = build_reference(x_train, prepared.preprocessing, prepared.splits.y_test, prepared.labels, 2000, seed)
        predicted = pd.Series(np.asarray(prepared.labels, dtype=object)[prepared.splits.y_test])
        columns = sorted(np.random.default_rng(seed).choice(x_test.columns, 3, replace=False))
        shifted = x_test.copy()
        for column in columns:
            shifted[column] = shifted[column] + x_train[column].std()
        for kind, rows in (("clean", x_test), ("shifted", shifted)):
            name = f"case-{seed}-{kind}"
            x_train.to_parquet(scratch / f"{name}-reference.parquet")
            rows.to_parquet(scratch / f"{name}-current.parquet")
            cases[name] = {"shifted": columns if kind == "shifted" else [],
                           "ours": sorted(measure_drift(rows, predicted, reference, config.monitoring.drift).drifted_features)}
    return cases


def run_evidently(reference, current, scratch: Path) -> dict | None:
    if not EVIDENTLY_PYTHON.is_file():
        return None
    reference.to_parquet(scratch / "reference.parquet")
    current.to_parquet(scratch / "current.parquet")
    output = subprocess.run([str(EVIDENTLY_PYTHON), str(HERE / "monitoring_evidently.py"), str(scratch)],
                            capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="maas-bench-monitor-"))
    os.environ.update(MAAS_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    sys.path.insert(0, str(ROOT))
    from maas.cli import quiet_defaults

    quiet_defaults()
    from flows.monitor import monitor
    from tasks.check import resolve_watched
    from flows.train_pipeline import train_pipeline
    from maas.config import load_config
    from maas.service_store import connect
    from maas.tracking import mlflow_client
    from tasks.data import prepare_data

    config = load_config(ROOT / "configs" / "quick.yaml", "breast_cancer",
                         overrides=["serving.build_bento=false", "compression.variants=[fp32]"])
    summary = train_pipeline(config).to_dict()
    prepared = prepare_data(config.data, config.seed)
    watched = resolve_watched(mlflow_client(), config, home)
    rows = logged_rows(prepared, args.rows)
    connection = connect()
    labels_path = fill_log(connection, watched.bundle, rows, f"{summary['model_name']}/{summary['model_version']}@champion", home)
    checked = config.model_copy(update={"monitoring": config.monitoring.model_copy(
        update={"labels_path": str(labels_path), "retrain": False})})

    stages, logged = time_stages(connection, watched, checked, labels_path)
    started = time.perf_counter()
    check = monitor(checked).to_dict()
    check_seconds = time.perf_counter() - started
    cases = detection_cases(config, home)
    evidently = run_evidently(prepared.splits.x_train, logged.inputs, home)
    for name, found in (evidently or {}).get("cases", {}).items():
        cases[name]["evidently"] = sorted(found)

    report = {
        "measured_at": now(), "machine": machine(), "rows": args.rows, "features": len(logged.inputs.columns),
        "check_seconds": check_seconds, "target_seconds": 30, "stages": stages,
        "check_drifted": sorted(check["drift"]["drifted_features"]), "check_alerts": [a["kind"] for a in check["alerts"]],
        "evidently": evidently, "detection_cases": cases,
    }
    write_results("monitoring", report, render)


def render(report: dict) -> str:
    stages = report["stages"]["seconds"]
    drift_s = stages["drift"]
    lines = [
        f"# Monitoring check over {report['rows']:,} logged predictions ({report['features']} features)", "",
        measured_on(report), "",
        "| what | seconds | |", "|---|---:|---|",
        f"| full `maas monitor` check (Prefect flow, MLflow run, report) | {report['check_seconds']:.2f} | "
        f"target < {report['target_seconds']} s: {report['target_seconds'] / report['check_seconds']:.1f}x under |",
        f"| read the log (100k JSON requests -> table) | {stages['read_log']:.2f} | |",
        f"| drift (PSI + KS, {report['features']} features, predictions) | {drift_s:.2f} | |",
        f"| join 100k labels, live quality | {stages['labels_and_quality']:.2f} | |",
    ]
    evidently = report["evidently"]
    if evidently:
        lines.append(f"| Evidently {evidently['version']} DataDriftPreset, same rows as a DataFrame | {evidently['seconds']:.2f} | "
                     f"our drift stage {evidently['seconds'] / drift_s:.1f}x faster; our whole check "
                     f"{evidently['seconds'] / report['check_seconds']:.2f}x faster than Evidently's drift alone |")
    lines += ["", f"Drifted features found by the check: {', '.join(report['check_drifted']) or 'none'} "
                  f"(shifted: {', '.join(SHIFTED)}); alerts: {', '.join(report['check_alerts']) or 'none'}."]
    if evidently:
        lines.append(f"Evidently's drifted columns: {', '.join(evidently['drifted']) or 'none'} "
                     f"({evidently['n_drifted']} of {evidently['n_columns']}).")
    else:
        lines.append("Evidently not measured: `make bench` creates .bench-venv with it.")
    lines += ["", "## Detection: breast_cancer test split (114 rows) vs the training split, 10 seeds", "",
              "| detector | seeds with exactly the 3 shifted features flagged | false flags on unshifted samples "
              "(features, all seeds) | seeds with any false flag |", "|---|---:|---:|---:|"]
    cases = report["detection_cases"]
    for detector in ("ours", "evidently"):
        if not all(detector in case for case in cases.values()):
            continue
        shifted = [case for name, case in cases.items() if name.endswith("shifted")]
        clean = [case for name, case in cases.items() if name.endswith("clean")]
        exact = sum(case[detector] == case["shifted"] for case in shifted)
        false_flags = sum(len(case[detector]) for case in clean)
        label = "maas (PSI > 0.2 and KS p < 0.01, bins by sample size)" if detector == "ours" else \
            "Evidently DataDriftPreset (its defaults: KS p < 0.05 under 1000 rows)"
        lines.append(f"| {label} | {exact}/{len(shifted)} | {false_flags} | "
                     f"{sum(bool(case[detector]) for case in clean)}/{len(clean)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
