"""A run's cost against the table's size under a time budget: `maas run` (default config) on a
generated 20-column, 5-class Parquet table of N rows, in a fresh MAAS_HOME each: wall time, peak
memory of the run's process tree, test macro F1, what the budget cut, and how the best trial's
validation F1 on its sample carried to the network trained on all rows. `--budget` (default: the
config's own, 9 minutes) applies to every size; `--unbounded ROWS ...` adds runs with no budget
(budget.time_s=null, and the trials and the families on every row rather than a sample) to compare
against; `--keep` adds the runs to the committed results instead of replacing them.

Run: .venv/bin/python benchmarks/budget.py [--budget 9m] [--unbounded 200000] [ROWS ...]
(writes results/budget.*)
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

from common import cpu_label, machine, measured_on, now, write_results

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
    """budget: a duration, 'default' (the config's) or 'none' (unbounded)."""
    table = scratch / f"rows-{rows}.parquet"
    if not table.exists():
        wide_table(rows).to_parquet(table)
    summary = scratch / f"summary-{rows}-{budget}.json"
    env = {**os.environ, "MAAS_HOME": str(scratch / f"home-{rows}-{budget}")}
    # none: no time budget and no samples (trials and families on every row): the run's cost unbounded
    unbounded = ["--set", "budget.time_s=null", "--set", "tuning.sample_rows=null", "--set", "selection.sample_rows=null"]
    limit = {"default": [], "none": unbounded}.get(budget, ["--budget", budget])
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "maas", "run", "--dataset", str(table), "--target", "label",
                                *limit, "--summary", str(summary), "--set", "serving.build_bento=false"],
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
    tuning = found.get("tuning") or {}
    return {"measured": where_and_when(now(), machine()), "rows": rows, "budget": budget, "budget_s": (found.get("budget") or {}).get("time_s"), "exit_code": process.returncode, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak / 2**30, 2), "test_f1_macro": found.get("test_metrics", {}).get("f1_macro"),
            "family": found.get("family"), "trial_rows": tuning.get("trial_rows"),
            "best_trial_val_f1": tuning.get("best_val_f1_macro"), "final_val_f1": tuning.get("final_val_f1_macro"),
            "stage_seconds": {k: round(v, 1) for k, v in found.get("stage_seconds", {}).items()},
            "cut": (found.get("budget") or {}).get("cut", {})}


def where_and_when(measured_at: str, on: dict) -> str:
    """A run's date and CPU, kept with it: --keep adds runs to rows measured on another machine."""
    return f"{measured_at[:10]}, {cpu_label(on)}"


def render(report: dict) -> str:
    lines = ["# A run's cost against rows, under a time budget", "",
             measured_on(report) + " That is the latest run's machine: each row names its own date and CPU.", "",
             "`maas run` with the default config, a generated 20-column 5-class Parquet table, a fresh MAAS_HOME "
             "per run (no Bento build). Budget `default` is the config's (`budget.time_s`), `none` unbounded. Peak "
             "memory: the run's process tree, sampled every 0.5 s. Trial / full: the best trial's validation macro F1 "
             "training on its sample, and the network's trained on every training row with the chosen settings.", "",
             "| rows | budget | wall s | peak GiB | test macro F1 | family | trial rows | trial / full val F1 "
             "| what the budget cut | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def figure(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    for row in report["runs"]:
        cut = "; ".join(f"{stage}: {what}" for stage, what in row["cut"].items()) or "-"
        budget = row["budget"] if row.get("budget_s") is None else f"{row['budget']} ({row['budget_s']:.0f} s)"
        lines.append(f"| {row['rows']:,} | {budget} | {row['wall_s']} | {row['peak_rss_gib']} | "
                     f"{figure(row['test_f1_macro'])} | {row['family']} | {row['trial_rows']} | "
                     f"{figure(row.get('best_trial_val_f1'))} / {figure(row.get('final_val_f1'))} | {cut} | "
                     f"{row.get('measured', '-')} |")
    unbounded = {row["rows"]: row for row in report["runs"] if row["budget"] == "none"}
    for row in report["runs"]:
        if row["budget"] != "none" and row["rows"] in unbounded and row["test_f1_macro"] is not None \
                and unbounded[row["rows"]]["test_f1_macro"] is not None:
            other = unbounded[row["rows"]]
            lines += ["", f"{row['rows']:,} rows, budget {row['budget']} against unbounded: {row['wall_s']} s vs "
                      f"{other['wall_s']} s ({other['wall_s'] / row['wall_s']:.1f}x), test macro F1 "
                      f"{row['test_f1_macro']:.4f} vs {other['test_f1_macro']:.4f} "
                      f"({(row['test_f1_macro'] - other['test_f1_macro']) * 100:+.2f} points"
                      f"{'; target >= -0.5' if row['budget'] == 'default' else ''})"]
    lines += ["", "Seconds per stage:", "", "| rows | budget | " + " | ".join(report["runs"][0]["stage_seconds"]) + " |",
              "|---|---|" + "---|" * len(report["runs"][0]["stage_seconds"])]
    for row in report["runs"]:
        lines.append(f"| {row['rows']:,} | {row['budget']} | " + " | ".join(str(v) for v in row["stage_seconds"].values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="default", help="a duration (9m), default (the config's) or none")
    parser.add_argument("--unbounded", nargs="*", type=int, default=[], help="also run these sizes with no budget")
    parser.add_argument("--keep", action="store_true", help="add to the committed results (same rows and budget: replaced)")
    parser.add_argument("rows", nargs="*", type=int, default=None, help="default: 10k 50k 200k 1M (none with --keep)")
    args = parser.parse_args()
    if args.rows is None:
        args.rows = [] if args.keep else [10_000, 50_000, 200_000, 1_000_000]
    with tempfile.TemporaryDirectory() as scratch:
        report = {"measured_at": now(), "machine": machine(), "runs": []}
        planned = [*((rows, args.budget) for rows in args.rows), *((rows, "none") for rows in args.unbounded)]
        if args.keep:
            kept = json.loads((ROOT / "benchmarks" / "results" / "budget.json").read_text())
            report["runs"] = [{"measured": where_and_when(kept["measured_at"], kept["machine"]), **run}
                              for run in kept["runs"] if (run["rows"], run["budget"]) not in set(planned)]
        for rows, budget in planned:
            report["runs"].append(run(rows, budget, Path(scratch)))
            print(report["runs"][-1], flush=True)
    write_results("budget", report, render)


if __name__ == "__main__":
    main()
