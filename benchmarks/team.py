"""Team mode, measured on this machine's PostgreSQL and Redis, in one run:

- run_tuning: the tune stage of `maas run` (default config, --run-trials trials, no pruning) with
  tuning.workers 1 and 2; trials per second of the stage, as the run's summary times it.
- tuning: trials of one Optuna study in 2 worker processes (started ahead, as the flow starts them,
  or at the study) against 1 process, and against 2 threads (tuning.n_jobs, the GIL-bound
  alternative). Each arm runs the same study (the default config's network search space on
  breast_cancer, --trials trials, no pruning so that every trial trains its epochs) in a storage
  whose schema exists, as after a run's first study (creating it is a one-off 1.3 s on SQLite);
  trials per second over the whole study; an untimed study first warms the process; arms
  alternate, medians reported. --storage: a PostgreSQL admin URL (each study its own database),
  default SQLite files.
- replicas: the service as 2 replicas (one worker each; limits in Redis, the store in PostgreSQL)
  against 1, at concurrency 32 with one-row requests (the client splits its connections between
  the replicas, as a load balancer would); then a 10 s burst at both with a 50-a-minute key.
- the stack: `maas run` on breast_cancer against a tracking server and a Prefect server, both on
  PostgreSQL, against the embedded default, stage by stage.

Usage: python benchmarks/team.py [--rounds 3] [--trials 16] [--run-trials 20] [--storage ADMIN_URL]
       [--skip run_tuning tuning replicas stack]
Writes benchmarks/results/team.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(ROOT / "benchmarks"))  # serving.py's own imports
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

from benchmarks.common import machine, measured_on, now, write_results  # noqa: E402

AHEAD_S = 12.0  # a `maas run` starts its tuning workers about 14 s before its tune stage here
ARMS = {"1 process": {}, "2 worker processes, started ahead": {"workers": 2},
        "2 worker processes, started at the study": {"workers": 2}, "2 threads (n_jobs)": {"n_jobs": 2}}


@contextmanager
def fresh_database(admin_url: str | None, home: Path):
    """A fresh database URL: a new SQLite file, or a new PostgreSQL database dropped afterwards."""
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


def timed_study(prepared, config, arm: str, storage: str) -> dict:
    from tasks.train import TrainingSettings
    from tasks.tune import Objective, ready_storage, run_study
    from tasks.tune_workers import start_ahead

    changes = ARMS[arm]
    tuning = config.tuning.model_copy(update={**changes, "storage": storage, "pruner": "none",
                                              "patience": config.tuning.max_epochs})  # every trial its epochs
    ready_storage(tuning)  # the schema exists, as after a first run, for every arm
    if "started ahead" in arm:  # as the flow does: their imports run before the study, not in it
        start_ahead(changes["workers"] - 1, tuning)
        time.sleep(AHEAD_S)
    started = time.perf_counter()
    result = run_study(Objective(prepared, TrainingSettings(config.model, config.train), tuning, config.seed),
                       tuning, "bench", config.seed)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "trials": result.n_complete + result.n_pruned, "failed": result.n_failed,
            "trials_per_s": (result.n_complete + result.n_pruned) / seconds, "epochs": result.epochs_total,
            "epochs_per_s": result.epochs_total / seconds}


def tuning_section(args) -> dict:
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
        with fresh_database(args.storage, Path(home)) as storage:  # first calls' costs (imports, kernels) untimed
            timed_study(prepared, config.model_copy(update={"tuning": config.tuning.model_copy(update={"n_trials": 4})}),
                        "1 process", storage)
        for round_index in range(args.rounds):
            for arm in ARMS:
                with fresh_database(args.storage, Path(home)) as storage:
                    runs[arm].append(timed_study(prepared, config, arm, storage))
                print(round_index, arm, {key: round(value, 3) for key, value in runs[arm][-1].items()}, flush=True)
    return {"trials": args.trials, "rounds": args.rounds, "storage": "PostgreSQL" if args.storage else "SQLite",
            "runs": runs, "median_trials_per_s": {arm: statistics.median(run["trials_per_s"] for run in arm_runs)
                                                  for arm, arm_runs in runs.items()},
            "median_epochs_per_s": {arm: statistics.median(run["epochs_per_s"] for run in arm_runs)
                                    for arm, arm_runs in runs.items()}}


def replicas_section(seconds: float) -> dict:
    """One replica against two, then the burst; each replica a `bentoml serve` of the service."""
    import asyncio
    import json

    from sklearn.datasets import load_breast_cancer

    from maas.config import ServingConfig
    from maas.api_keys import create_key
    from maas.service_store import connect
    from serving import free_port, load, start, train_bundle

    rows = json.loads(load_breast_cancer(as_frame=True).data.head(1).to_json(orient="records"))
    payload = json.dumps({"rows": rows}).encode()
    result = {}
    with tempfile.TemporaryDirectory() as folder, fresh_database(ADMIN_URL, Path(folder)) as store_url:
        home = Path(folder)
        os.environ.update(MAAS_HOME=str(home / "trainer"), MAAS_STORE_URL=store_url)
        bundle = train_bundle(home)
        store = connect()
        _, fast_key = create_key(store, "bench", "fast")
        _, slow_key = create_key(store, "burst", "slow")
        prefix = f"maas-bench-{uuid.uuid4().hex[:8]}:"
        serving = ServingConfig(workers=1, limits_backend="redis", redis_url=REDIS_URL, limits_prefix=prefix, tiers={
            "fast": {"requests_per_minute": 10**9, "monthly_rows": 10**12},
            "slow": {"requests_per_minute": 50, "monthly_rows": 10**12}})

        def replica(index: int):
            port = free_port()
            env = dict(os.environ, MAAS_HOME=str(home / f"host-{index}"), BENTOML_HOME=str(home / "bentoml"),
                       BENTOML_DO_NOT_TRACK="true", MAAS_BUNDLE_DIR=str(bundle), MAAS_MODEL_LABEL="bench/1",
                       MAAS_SERVING_CONFIG=serving.model_dump_json(), PYTHONPATH=str(ROOT))
            process, _ = start([sys.executable, "-m", "bentoml", "serve", "deployments.service:MaasService", "--port",
                                str(port), "--host", "127.0.0.1"], env, port, ROOT, home / f"replica-{index}.log")
            return process, f"http://127.0.0.1:{port}/predict"

        async def against(urls: list[str], key: str, concurrency: int, duration: float) -> dict:
            headers = {"X-API-Key": key, "content-type": "application/json"}
            parts = await asyncio.gather(*(load(url, payload, headers, concurrency // len(urls), duration, 10**9)
                                           for url in urls))
            ok = sum(part["ok"] for part in parts)
            return {"rows_per_s": sum(part["requests_per_s"] for part in parts), "ok": ok,
                    "p99_ms": max(part["p99_ms"] for part in parts if part["p99_ms"] is not None),
                    "statuses": [part["statuses"] for part in parts], "dropped": sum(part["dropped"] for part in parts)}

        processes = []
        try:
            first = replica(1)
            processes.append(first[0])
            result["1 replica"] = asyncio.run(against([first[1]], fast_key, 32, seconds))
            second = replica(2)
            processes.append(second[0])
            result["2 replicas"] = asyncio.run(against([first[1], second[1]], fast_key, 32, seconds))
            started = time.perf_counter()
            burst = asyncio.run(against([first[1], second[1]], slow_key, 32, 10.0))
            elapsed = time.perf_counter() - started
            result["burst"] = {"admitted": burst["ok"], "seconds": elapsed,
                               "allowed": 50 + int(elapsed * 50 / 60), "statuses": burst["statuses"]}
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=60)
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for name in client.scan_iter(f"{prefix}*"):
                client.delete(name)
            os.environ.pop("MAAS_STORE_URL", None)
    print("replicas", {name: value for name, value in result.items()}, flush=True)
    return result


def maas_run(env: dict, summary: Path, overrides: tuple[str, ...] = ()) -> dict:
    import json
    import subprocess

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "maas", "run", "--dataset", "breast_cancer", "--summary", str(summary),
                    *(part for override in overrides for part in ("--set", override))],
                   env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written = json.loads(summary.read_text())
    return {"wall_s": time.perf_counter() - started, "stages_s": written["stage_seconds"],
            "tuning": {key: written.get("tuning", {}).get(key)
                       for key in ("n_complete", "n_pruned", "n_failed", "epochs_total")}}


SECTIONS = ("run_tuning", "tuning", "replicas", "stack")
RUN_ARMS = {"1 process": "tuning.workers=1", "2 worker processes": "tuning.workers=2"}


def ready_study_storage(home: Path) -> None:
    """MAAS_HOME `home` with its study storage's schema made, as after a first run (the runs of both
    arms time their studies, not the one-off schema)."""
    from maas.config import TuningConfig
    from tasks.tune import ready_storage

    home.mkdir(parents=True)
    ready_storage(TuningConfig(storage=f"sqlite:///{home / 'optuna.db'}"))


def run_tuning_section(args) -> dict:
    """The tune stage of `maas run` (default config, no pruning: every trial trains its epochs) with 1
    and 2 processes: the workers start with the run, so their imports overlap its start."""
    from maas.config import load_config

    max_epochs = load_config(ROOT / "configs" / "default.yaml").tuning.max_epochs  # patience: every trial its epochs
    runs = {arm: [] for arm in RUN_ARMS}
    with tempfile.TemporaryDirectory() as folder:
        base = {key: value for key, value in os.environ.items()
                if not key.startswith(("PREFECT_API", "MLFLOW_TRACKING", "MAAS_STORE"))}
        for round_index in range(args.rounds):
            for arm, override in RUN_ARMS.items():
                home = Path(folder) / f"{round_index}-{arm.split()[0]}"
                ready_study_storage(home)
                run = maas_run(dict(base, MAAS_HOME=str(home)), home.with_suffix(".json"),
                               (override, "tuning.pruner=none", f"tuning.patience={max_epochs}",
                                f"tuning.n_trials={args.run_trials}"))
                finished = (run["tuning"]["n_complete"] or 0) + (run["tuning"]["n_pruned"] or 0)
                seconds = run["stages_s"]["tune"]
                runs[arm].append({**run, "trials": finished, "seconds": seconds, "failed": run["tuning"]["n_failed"] or 0,
                                  "trials_per_s": finished / seconds, "epochs_per_s": run["tuning"]["epochs_total"] / seconds})
                print("run", round_index, arm, round(runs[arm][-1]["trials_per_s"], 3), round(run["wall_s"], 1),
                      flush=True)
    return {"trials": args.run_trials, "rounds": args.rounds, "runs": runs,
            "median_trials_per_s": {arm: statistics.median(run["trials_per_s"] for run in arm_runs)
                                    for arm, arm_runs in runs.items()},
            "median_epochs_per_s": {arm: statistics.median(run["epochs_per_s"] for run in arm_runs)
                                    for arm, arm_runs in runs.items()},
            "median_wall_s": {arm: statistics.median(run["wall_s"] for run in arm_runs)
                              for arm, arm_runs in runs.items()}}


def wait_up(url: str, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")


def stack_section() -> dict:
    """`maas run` embedded (SQLite, Prefect's temporary server) against the team stack (tracking
    server and Prefect server on PostgreSQL), the servers started beforehand."""
    import signal
    import subprocess

    from serving import free_port, start

    result = {}
    with tempfile.TemporaryDirectory() as folder, fresh_database(ADMIN_URL, Path(folder)) as mlflow_db, \
            fresh_database(ADMIN_URL, Path(folder)) as prefect_db:
        home = Path(folder)
        base = {key: value for key, value in os.environ.items()
                if not key.startswith(("PREFECT_API", "MLFLOW_TRACKING", "MAAS_STORE"))}
        result["embedded"] = maas_run(dict(base, MAAS_HOME=str(home / "embedded")), home / "embedded.json")
        tracking_port, prefect_port = free_port(), free_port()
        tracking = subprocess.Popen([sys.executable, "-m", "maas", "tracking-server", "--backend-store-uri", mlflow_db,
                                     "--artifacts-destination", str(home / "artifacts"), "--port", str(tracking_port),
                                     "--workers", "1"], cwd=ROOT, stdout=(home / "tracking.log").open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
        prefect_env = dict(base, PREFECT_HOME=str(home / "prefect-home"), PREFECT_UI_ENABLED="false",
                           PREFECT_SERVER_ANALYTICS_ENABLED="false",
                           PREFECT_API_DATABASE_CONNECTION_URL=prefect_db.replace("+psycopg", "+asyncpg"))
        prefect = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                    str(prefect_port)], env=prefect_env, stdout=(home / "prefect.log").open("w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for url in (f"http://127.0.0.1:{tracking_port}/health", f"http://127.0.0.1:{prefect_port}/api/health"):
                wait_up(url)
            team_env = dict(base, MAAS_HOME=str(home / "team"), MLFLOW_TRACKING_URI=f"http://127.0.0.1:{tracking_port}",
                            PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api")
            result["team"] = maas_run(team_env, home / "team.json")
        finally:
            for server in (tracking, prefect):
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
    print("stack", result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--run-trials", type=int, default=20, help="the study of the maas run arms (default config's)")
    parser.add_argument("--seconds", type=float, default=6.0, help="per replicas cell")
    parser.add_argument("--storage", default=None, help="a PostgreSQL admin URL; default: SQLite files")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    args = parser.parse_args()
    report = {"measured_at": now(), "machine": machine()}
    previous_path = ROOT / "benchmarks" / "results" / "team.json"
    if args.skip and previous_path.is_file():  # a skipped section keeps its figures from the run that made them
        previous = json.loads(previous_path.read_text())
        for section in args.skip:
            if section in previous:
                report[section] = {**previous[section], "measured_at": previous[section].get(
                    "measured_at", previous["measured_at"])}
    if "run_tuning" not in args.skip:
        report["run_tuning"] = run_tuning_section(args)
    if "tuning" not in args.skip:
        report["tuning"] = tuning_section(args)
    if "replicas" not in args.skip:
        report["replicas"] = replicas_section(args.seconds)
    if "stack" not in args.skip:
        report["stack"] = stack_section()
    for section in SECTIONS:
        if section not in args.skip and section in report:
            report[section]["measured_at"] = report["measured_at"]
    write_results("team", report, render)


def section_date(report: dict, section: dict) -> list[str]:
    """A line naming when a section was measured, where that differs from the report's run."""
    at = section.get("measured_at")
    return [f"Measured {at} (a separate run).", ""] if at and at != report["measured_at"] else []


def tuning_table(section: dict, seconds_header: str) -> list[str]:
    """Each arm's median trials/s and epochs/s against the 1-process arm, its runs' seconds, its failed
    trials; then whether every study reached its trial count exactly."""
    trials, epochs = section["median_trials_per_s"], section["median_epochs_per_s"]
    lines = [f"| arm | median trials/s | against 1 process | median epochs/s | against 1 process | paired: median of "
             f"the rounds' ratios (lowest) | {seconds_header} | failed trials |", "|---|---|---|---|---|---|---|---|"]
    for arm, runs in section["runs"].items():
        paired = [run["trials_per_s"] / alone["trials_per_s"] for run, alone in zip(runs, section["runs"]["1 process"])]
        lines.append(f"| {arm} | {trials[arm]:.3f} | {trials[arm] / trials['1 process']:.2f}x | {epochs[arm]:.1f} | "
                     f"{epochs[arm] / epochs['1 process']:.2f}x | {statistics.median(paired):.2f}x ({min(paired):.2f}x) | "
                     f"{', '.join(format(run['seconds'], '.1f') for run in runs)} | {sum(run['failed'] for run in runs)} |")
    exact = all(run["trials"] == section["trials"] for runs in section["runs"].values() for run in runs)
    return lines + ["", "Paired: each round's arm against that round's 1-process study; the machine's speed drifts "
                        "between rounds (the 1-process study took from 6.0 to 9.2 s in one run), and a ratio within a "
                        "round cancels the drift that a ratio of medians keeps.", "",
                    f"Every study reached its trial count exactly (none lost, none run twice): {exact}."]


def render(report: dict) -> str:
    lines = ["# Team mode", "", measured_on(report)]
    in_runs = report.get("run_tuning")
    if in_runs:
        lines += ["", "## Tuning in `maas run`", "", *section_date(report, in_runs),
                  f"`maas run --dataset breast_cancer --set tuning.pruner=none --set tuning.patience=60 --set "
                  f"tuning.n_trials={in_runs['trials']}` "
                  f"with tuning.workers 1 and 2, {in_runs['rounds']} alternating rounds; trials/s of the tune stage as "
                  "the run's summary times it (the study, each trial's MLflow child run, the study's plots). Each "
                  "run's MAAS_HOME holds a study storage already, as after a first run. The run's MLflow recorder process and Prefect's server share the 2 cores with the trials.", "",
                  *tuning_table(in_runs, "tune stage (s)"),
                  "", "Median wall of the whole command: " + ", ".join(
                      f"{arm} {seconds:.1f} s" for arm, seconds in in_runs["median_wall_s"].items()) + "."]
    tuning = report.get("tuning")
    if tuning:
        lines += ["", f"## Tuning across processes ({tuning['storage']} study storage)", "", *section_date(report, tuning),
                  f"breast_cancer, the default network search space, {tuning['trials']} trials a study without pruning, "
                  f"{tuning['rounds']} alternating rounds, in one process that prepared the data once; every trial trains all "
                  f"its epochs (patience = max_epochs), so trials differ only in the settings sampled, and epochs/s "
                  f"checks trials/s; both over the whole "
                  f"study, in a storage whose schema exists (as after a first run), after an untimed study that warmed "
                  f"the process. Workers started ahead are started {AHEAD_S:.0f} s before the "
                  "study, as `maas run` starts them with the run; started at the study, their start-up (spawn, imports) is "
                  "inside it.", "",
                  *tuning_table(tuning, "runs (s)")]
    replicas = report.get("replicas")
    if replicas:
        one = replicas["1 replica"]["rows_per_s"]
        lines += ["", "## Service replicas (Redis limits, PostgreSQL store)", "", *section_date(report, replicas),
                  "One-row requests at concurrency 32, the client's connections split between the replicas; each "
                  "replica one worker. Client and replicas share the 2 cores.", "",
                  "| replicas | rows/s | against 1 | p99 ms | dropped |", "|---|---|---|---|---|"]
        for name in ("1 replica", "2 replicas"):
            cell = replicas[name]
            lines.append(f"| {name} | {cell['rows_per_s']:,.0f} | {cell['rows_per_s'] / one:.2f}x | "
                         f"{cell['p99_ms']:.1f} | {cell['dropped']} |")
        burst = replicas["burst"]
        lines += ["", f"Burst: {burst['seconds']:.1f} s at both replicas (concurrency 32) with a key of 50 requests a "
                      f"minute: {burst['admitted']} admitted, against {burst['allowed']} allowed (the bucket's 50 and "
                      f"the tokens refilled meanwhile); over by {max(0, burst['admitted'] - burst['allowed'])}."]
    stack = report.get("stack")
    if stack:
        embedded, team = stack["embedded"], stack["team"]
        lines += ["", "## A training run on the team stack", "", *section_date(report, stack),
                  "`maas run --dataset breast_cancer` (default config) embedded (SQLite, Prefect's temporary server) "
                  "against a `maas tracking-server` and a `prefect server` on PostgreSQL, started beforehand.", "",
                  "| stage | embedded s | team stack s | difference s |", "|---|---|---|---|"]
        for stage in embedded["stages_s"]:
            a, b = embedded["stages_s"][stage], team["stages_s"].get(stage, 0.0)
            lines.append(f"| {stage} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        lines.append(f"| wall (the command) | {embedded['wall_s']:.1f} | {team['wall_s']:.1f} | "
                     f"{team['wall_s'] - embedded['wall_s']:+.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
