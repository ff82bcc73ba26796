"""Team mode, measured: trials of one Optuna study in 2 worker processes against 1 process, and against
2 threads (tuning.n_jobs, the GIL-bound alternative), same study size, on real study storage.

Each arm runs the same study (the default config's network search space on breast_cancer, 16
trials, no pruning so that every trial trains its epochs) from empty storage; trials per second
counts the whole study, worker start-up included. Arms alternate, and the medians are reported.
--storage takes a PostgreSQL admin URL: each run then gets its own database, created and dropped.

Usage: python benchmarks/team.py [--rounds 3] [--trials 16] [--storage postgresql://postgres@127.0.0.1:5432/postgres]
Writes benchmarks/results/team.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, measured_on, now, write_results  # noqa: E402

ARMS = {"1 process": {}, "2 worker processes": {"workers": 2}, "2 threads (n_jobs)": {"n_jobs": 2}}


@contextmanager
def study_storage(admin_url: str | None, home: Path):
    """A fresh storage URL: a new SQLite file, or a new PostgreSQL database dropped afterwards."""
    if admin_url is None:
        yield f"sqlite:///{home / f'optuna-{uuid.uuid4().hex[:8]}.db'}"
        return
    import psycopg

    name = f"maas_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://{admin_url.split('://', 1)[1].rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def timed_study(prepared, config, changes: dict, storage: str) -> dict:
    from tasks.train import TrainingSettings
    from tasks.tune import Objective, run_study

    tuning = config.tuning.model_copy(update={**changes, "storage": storage, "pruner": "none"})
    started = time.perf_counter()
    result = run_study(Objective(prepared, TrainingSettings(config.model, config.train), tuning, config.seed),
                       tuning, "bench", config.seed)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "trials": result.n_complete + result.n_pruned, "failed": result.n_failed,
            "trials_per_s": (result.n_complete + result.n_pruned) / seconds, "epochs": result.epochs_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--storage", default=None, help="a PostgreSQL admin URL; default: SQLite files")
    args = parser.parse_args()

    import optuna

    from maas.config import load_config
    from tasks.data import prepare_data

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_config(ROOT / "configs" / "default.yaml", dataset="breast_cancer",
                         overrides=[f"tuning.n_trials={args.trials}"])
    prepared = prepare_data(config.data, config.seed)
    runs = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as home:
        os.environ["MAAS_HOME"] = home
        for round_index in range(args.rounds):
            for arm, changes in ARMS.items():
                with study_storage(args.storage, Path(home)) as storage:
                    runs[arm].append(timed_study(prepared, config, changes, storage))
                print(round_index, arm, {key: round(value, 3) for key, value in runs[arm][-1].items()}, flush=True)
    report = {"measured_at": now(), "machine": machine(), "trials": args.trials, "rounds": args.rounds,
              "storage": "PostgreSQL" if args.storage else "SQLite", "runs": runs,
              "median_trials_per_s": {arm: statistics.median(run["trials_per_s"] for run in arm_runs)
                                      for arm, arm_runs in runs.items()}}
    write_results("team", report, render)


def render(report: dict) -> str:
    medians = report["median_trials_per_s"]
    one = medians["1 process"]
    lines = ["# Team mode", "", measured_on(report), "",
             f"## Tuning across processes ({report['storage']} study storage)", "",
             f"breast_cancer, the default network search space, {report['trials']} trials a study without pruning, "
             f"{report['rounds']} alternating rounds; trials/s over the whole study, worker start-up included.", "",
             "| arm | median trials/s | against 1 process | runs (s) | failed trials |", "|---|---|---|---|---|"]
    for arm, runs in report["runs"].items():
        lines.append(f"| {arm} | {medians[arm]:.3f} | {medians[arm] / one:.2f}x | "
                     f"{', '.join(format(run['seconds'], '.1f') for run in runs)} | {sum(run['failed'] for run in runs)} |")
    lines += ["", "Every study reached its trial count exactly (none lost, none run twice): "
              + str(all(run["trials"] == report["trials"] for runs in report["runs"].values() for run in runs)) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
