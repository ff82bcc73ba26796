"""How often a monitoring check raises an alarm on a model that has not changed, and how often it
catches one that has: the rules as shipped against the plain rules before them, on seeded draws.

  categories  drift of a categorical column of 10 to 1,000 names: PSI > 0.2 and a chi-square test
              over bins of enough rows, against PSI > 0.2 over a bin per category (unseen values
              expected at 0). Changed: a mid-frequency category takes a quarter of the rows.
  quality     live macro F1 of a 3-class model on windows of 30 to 1,000 labelled rows: more than
              0.05 under the test F1 with its 99% upper bound under it too, against the 0.05 drop
              alone. Changed: the model decays from F1 0.80 to 0.66.
  rollback    the replaced champion scored on the new one's labelled rows: ahead by more than 0.02
              with its lead's 99% lower bound above 0 (paired bootstrap), against the margin alone.
              Changed: the new champion is 10 points less accurate.
  dates       an order date served two months past the training year: time moved on (reported,
              not counted), against PSI and KS on days since 1970. Changed: one month of the
              training year served (inside its range).

Usage: python benchmarks/false_alarms.py [--draws 200]
Writes benchmarks/results/false_alarms.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, measured_on, now, write_results  # noqa: E402

from maas.config import DriftConfig, MonitoringConfig  # noqa: E402
from tasks.drift import build_reference, measure_drift, psi  # noqa: E402
from tasks.quality import LiveComparison, label_metrics, live_quality, rollback_decision  # noqa: E402
from tests.scenarios import DECAYED, KEPT, ORDERS_PREPROCESSING, THREE, many_names, orders, three_class_windows  # noqa: E402

WINDOWS = (30, 100, 300, 1000)


def per_category_psi(reference: dict, values: pd.Series) -> float:
    """The rule before: a bin per training category and one for the rest, expected at 0."""
    shares = reference["shares"]
    current = values.astype(str).where(values.isin(list(shares)), "(other)").value_counts(normalize=True)
    return psi([*shares.values(), 0.0], [float(current.get(category, 0.0)) for category in [*shares, "(other)"]])


def new_counts() -> dict[str, int]:
    return {"ours_false": 0, "before_false": 0, "ours_caught": 0, "before_caught": 0}


def as_rates(counts: dict[str, int], draws: int) -> dict[str, float]:
    return {key: value / draws for key, value in counts.items()}


def categories(draws: int) -> list[dict]:
    rng = np.random.default_rng(0)
    config, rows = DriftConfig(), []
    for levels in (10, 50, 300, 1000):
        scenario = many_names(rng, levels, "town")
        for n in (100, 400, 2000):
            counts = new_counts()
            for case, distribution in (("false", scenario.shares), ("caught", scenario.moved)):
                for _ in range(draws):
                    logged = scenario.logged(rng, n, distribution)
                    report = measure_drift(logged, pd.Series(["no"] * n), scenario.reference, config)
                    counts[f"ours_{case}"] += "town" in report.drifted_features
                    counts[f"before_{case}"] += per_category_psi(scenario.reference["categorical"]["town"],
                                                                 logged["town"]) > config.psi_threshold
            rows.append({"levels": levels, "rows": n, **as_rates(counts, draws)})
    return rows


def quality(draws: int) -> dict:
    window, labels = three_class_windows(np.random.default_rng(1), version="1"), THREE
    f1 = {}
    for name, matrix in (("kept", KEPT), ("worse", DECAYED)):  # the population's F1: the test F1 of a large split
        population = window(100_000, matrix)
        f1[name] = label_metrics(population["label"], population["predicted"], labels)["f1_macro"]
    monitoring, rows = MonitoringConfig(), []
    for n in WINDOWS:
        counts = new_counts()
        for case, matrix in (("false", KEPT), ("caught", DECAYED)):
            for _ in range(draws):
                report = live_quality(window(n, matrix), "1", labels, {"f1_macro": f1["kept"]}, monitoring)
                counts[f"ours_{case}"] += report.alert
                counts[f"before_{case}"] += report.f1_drop > monitoring.max_quality_drop
        rows.append({"rows": n, **as_rates(counts, draws)})
    return {"test_f1": f1["kept"], "decayed_f1": f1["worse"], "rows": rows}


def rollback(draws: int) -> list[dict]:
    rng = np.random.default_rng(2)
    labels, monitoring, rows = ["no", "yes"], MonitoringConfig(), []
    for n in WINDOWS:
        counts = new_counts()
        for case, new_accuracy in (("false", 0.85), ("caught", 0.75)):
            for _ in range(draws):
                truth = rng.integers(0, 2, n)
                new = np.where(rng.uniform(size=n) < new_accuracy, truth, 1 - truth)
                old = np.where(rng.uniform(size=n) < 0.85, truth, 1 - truth)
                truth, new, old = (pd.Series(np.array(labels)[values]) for values in (truth, new, old))
                scores = LiveComparison.of(truth, new, old, labels, monitoring.quality_confidence)
                counts[f"ours_{case}"] += rollback_decision("2", "1", scores, monitoring).roll_back
                counts[f"before_{case}"] += scores.old_f1 > scores.new_f1 + monitoring.rollback_margin
        rows.append({"rows": n, **as_rates(counts, draws)})
    return rows


def dates(draws: int) -> dict:
    rng = np.random.default_rng(3)
    config, judged = DriftConfig(), DriftConfig(judge_recent_dates=True)
    reference = build_reference(orders(rng, "2025-01-01", 365, 3000), ORDERS_PREPROCESSING, np.zeros(3000, dtype=int),
                                ["no", "yes"], 2000, 0)
    counts = new_counts()
    for case, (start, days) in (("false", ("2026-03-01", 14)), ("caught", ("2025-03-01", 30))):
        for _ in range(draws):
            logged = orders(rng, start, days, 400)
            for rule, rule_config in (("ours", config), ("before", judged)):
                report = measure_drift(logged, pd.Series(["no"] * 400), reference, rule_config)
                counts[f"{rule}_{case}"] += "ordered" in report.drifted_features
    return as_rates(counts, draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="seeded draws per cell")
    args = parser.parse_args()
    report = {"measured_at": now(), "machine": machine(), "draws": args.draws, "categories": categories(args.draws),
              "quality": quality(args.draws), "rollback": rollback(args.draws), "dates": dates(args.draws)}
    write_results("false_alarms", report, render)


def rates(row: dict) -> str:
    return (f"{row['ours_false']:.1%} | {row['before_false']:.1%} | {row['ours_caught']:.1%} | "
            f"{row['before_caught']:.1%} |")


def render(report: dict) -> str:
    head = "| unchanged: alarms, ours | before | changed: caught, ours | before |"
    rule = "|---|---|---:|---:|---:|---:|"
    quality_report = report["quality"]
    lines = [
        "# False alarms and caught changes of a monitoring check", "", measured_on(report), "",
        f"Seeded draws, {report['draws']} per cell. 'Before': the plain rule each check used until now. See the script's "
        "docstring for the scenarios.", "",
        "## Drift of a categorical column (3,000 training rows; changed: a mid-frequency category takes a quarter "
        "of the rows)", "", "| names | logged rows " + head, rule,
        *[f"| {row['levels']:,} | {row['rows']:,} | {rates(row)}" for row in report["categories"]], "",
        f"## Live quality (3 classes; test F1 {quality_report['test_f1']:.3f}; changed: decayed to "
        f"{quality_report['decayed_f1']:.3f})", "", "| labelled rows " + head, rule[4:],
        *[f"| {row['rows']:,} | {rates(row)}" for row in quality_report["rows"]], "",
        "## Rollback (both versions 85% accurate; changed: the new one 75%)", "", "| labelled rows " + head, rule[4:],
        *[f"| {row['rows']:,} | {rates(row)}" for row in report["rollback"]], "",
        "## An order date (training: 2025; unchanged: 400 orders of March 2026; changed: 400 of March 2025)", "",
        "| " + head[2:], rule[8:], f"| {rates(report['dates'])}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
