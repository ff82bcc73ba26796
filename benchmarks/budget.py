"""A run's cost against the table's size under a time budget: `maas run` (default config) on a
generated 20-column, 5-class Parquet table of N rows with `--budget`, in a fresh MAAS_HOME each:
wall time, peak memory of the run's process tree, test macro F1, and what the budget cut.

Run: .venv/bin/python benchmarks/budget.py [--budget 9m] [ROWS ...]   (writes results/budget.*)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from common import machine, measured_on, now, write_results

ROOT = Path(__file__).resolve().parent.parent


def wide_table(rows: int, seed: int = 5) -> pd.DataFrame:
    """20 columns (16 numeric, 2 of them heavy-tailed, 4 categorical), 5 classes from a nonlinear
    score with noise, 3% gaps: the issue's 200k-row shape."""
    rng = np.random.default_rng(seed)
    numeric = rng.normal(0, 1, (rows, 16))
    numeric[:, 14:] = rng.standard_t(3, (rows, 2)) * 10
    categories = rng.integers(0, 6, (rows, 4))
    score = (numeric[:, :4] @ [1.0, -0.8, 0.6, 0.4] + np.sin(2 * numeric[:, 4]) + numeric[:, 5] * numeric[:, 6]
             + 0.5 * (categories[:, 0] == 2) - 0.5 * (categories[:, 1] == 4) + 0.05 * numeric[:, 14]
             + rng.normal(0, 0.8, rows))
    frame = pd.DataFrame(numeric, columns=[f"n{index}" for index in range(16)])
    for index in range(4):
        frame[f"c{index}"] = np.array(list("abcdef"))[categories[:, index]]
    frame["label"] = np.array(["v", "w", "x", "y", "z"])[np.digitize(score, np.quantile(score, [0.2, 0.4, 0.6, 0.8]))]
    frame.loc[rng.random(rows) < 0.03, "n0"] = np.nan
    return frame


def run(rows: int, budget: str, scratch: Path) -> dict:
    table = scratch / f"rows-{rows}.parquet"
    wide_table(rows).to_parquet(table)
    summary = scratch / f"summary-{rows}.json"
    env = {**os.environ, "MAAS_HOME": str(scratch / f"home-{rows}")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "maas", "run", "--dataset", str(table), "--target", "label",
                                "--budget", budget, "--summary", str(summary), "--set", "serving.build_bento=false"],
                               env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.5)
    wall = time.perf_counter() - started
    found = json.loads(summary.read_text()) if summary.exists() else {}
    return {"rows": rows, "budget": budget, "exit_code": process.returncode, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak / 2**30, 2), "test_f1_macro": found.get("test_metrics", {}).get("f1_macro"),
            "family": found.get("family"), "trial_rows": (found.get("tuning") or {}).get("trial_rows"),
            "stage_seconds": {k: round(v, 1) for k, v in found.get("stage_seconds", {}).items()},
            "cut": (found.get("budget") or {}).get("cut", {})}


def render(report: dict) -> str:
    lines = ["# A run's cost against rows, under a time budget", "", measured_on(report), "",
             "`maas run` with the default config and `--budget`, a generated 20-column 5-class Parquet table, a fresh "
             "MAAS_HOME per size (no Bento build). Peak memory: the run's process tree, sampled every 0.5 s.", "",
             "| rows | budget | wall s | peak GiB | test macro F1 | family | trial rows | what the budget cut |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        cut = "; ".join(f"{stage}: {what}" for stage, what in row["cut"].items()) or "-"
        f1 = "-" if row["test_f1_macro"] is None else f"{row['test_f1_macro']:.4f}"
        lines.append(f"| {row['rows']:,} | {row['budget']} | {row['wall_s']} | {row['peak_rss_gib']} | {f1} | "
                     f"{row['family']} | {row['trial_rows']} | {cut} |")
    lines += ["", "Seconds per stage:", "", "| rows | " + " | ".join(report["runs"][0]["stage_seconds"]) + " |",
              "|---|" + "---|" * len(report["runs"][0]["stage_seconds"])]
    for row in report["runs"]:
        lines.append(f"| {row['rows']:,} | " + " | ".join(str(v) for v in row["stage_seconds"].values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="9m")
    parser.add_argument("rows", nargs="*", type=int, default=[20_000, 200_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        report = {"measured_at": now(), "machine": machine(), "runs": []}
        for rows in args.rows:
            report["runs"].append(run(rows, args.budget, Path(scratch)))
            print(report["runs"][-1], flush=True)
    write_results("budget", report, render)


if __name__ == "__main__":
    main()
