"""Evidently's data drift on the cases benchmarks/monitoring.py wrote; runs in .bench-venv.

Input: a folder with reference.parquet + current.parquet (the timing case) and, optionally,
case-*-reference.parquet / case-*-current.parquet (the detection cases). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import evidently
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset


def drifted_columns(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[str], float]:
    """Columns Evidently's preset calls drifted (its per-column default method and threshold)."""
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(current_data=current, reference_data=reference)
    seconds = time.perf_counter() - started
    drifted = []
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            value, threshold = metric["value"], config["threshold"]
            is_p_value = "p_value" in config["method"]
            if (value < threshold) if is_p_value else (value >= threshold):
                drifted.append(config["column"])
    return drifted, seconds


def main() -> None:
    folder = Path(sys.argv[1])
    reference, current = pd.read_parquet(folder / "reference.parquet"), pd.read_parquet(folder / "current.parquet")
    drifted, seconds = drifted_columns(reference, current)
    cases = {}
    for path in sorted(folder.glob("case-*-current.parquet")):
        name = path.name.removesuffix("-current.parquet")
        cases[name] = drifted_columns(pd.read_parquet(folder / f"{name}-reference.parquet"), pd.read_parquet(path))[0]
    print(json.dumps({"version": evidently.__version__, "seconds": seconds, "drifted": drifted,
                      "n_drifted": len(drifted), "n_columns": len(current.columns), "cases": cases}))


if __name__ == "__main__":
    main()
