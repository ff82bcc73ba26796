"""The Optuna stage on real (SQLite) storage: budget, resume, pruning, failures, parallel trials."""

from __future__ import annotations

from contextlib import closing, contextmanager

import optuna
import pytest
from optuna.trial import TrialState

from maas.config import DataConfig, ModelConfig, TrainConfig, TuningConfig, load_config
from maas.errors import MaasInputError
from maas.run_context import RunContext
from maas.tracking import ensure_experiment, mlflow_client, parent_run
from tasks.data import prepare_data
from tasks.train import TrainingSettings
from tasks import tune_workers
from tasks.tune_workers import SURPLUS_ATTR, over_budget, spends_budget
from tests.conftest import at_once
from tasks.tune import (
    BASELINE_ATTR, Objective, TrialTracker, apply_hyperparameters, grid_space, open_storage, pick_pareto_trial,
    redacted, run_study, tuned_or_default,
)

FAST = {"max_epochs": 6, "patience": 3}
STUDY = pytest.mark.slow  # runs an Optuna study: trains real networks
# Only the crash test shortens the heartbeat: with a 2 s grace period, two parallel trials on two
# busy cores once missed a beat and a live trial was failed as stale under CI load.
CRASH = {"heartbeat_interval_s": 1, "grace_period_s": 5}


@pytest.fixture(scope="module")
def wine():
    return prepare_data(DataConfig(dataset="wine"), seed=0)


def tuning(**changes) -> TuningConfig:
    return TuningConfig(**{**FAST, **changes})


DEFAULTS = TrainingSettings(ModelConfig(), TrainConfig())


def objective(prepared, config: TuningConfig, tracker=None) -> Objective:
    return Objective(prepared, DEFAULTS, config, seed=0, tracker=tracker)


def tracked(client, experiment_id: str, parent_id: str, study_name: str, tmp_path) -> TrialTracker:
    return TrialTracker(RunContext(client, parent_id, experiment_id, tmp_path), study_name)


def states(study_name: str, config: TuningConfig) -> list[TrialState]:
    from tasks.tune import open_storage

    return [t.state for t in optuna.load_study(study_name=study_name, storage=open_storage(config)).trials]


@STUDY
def test_budget_counts_finished_trials_so_a_rerun_continues(wine, maas_home):
    first = run_study(objective(wine, tuning(n_trials=3)), tuning(n_trials=3), "resume", seed=0)
    assert first.n_complete + first.n_pruned == 3
    again = run_study(objective(wine, tuning(n_trials=5)), tuning(n_trials=5), "resume", seed=0)
    assert again.n_complete + again.n_pruned == 5  # 5 in total, not 3 + 5
    assert len(states("resume", tuning())) == 5


@STUDY
def test_a_rerun_on_another_table_tunes_in_a_study_of_its_own_and_the_first_tables_study_continues(wine, maas_home):
    """The same table continues its study; a grown one (other rows, another fingerprint) gets
    'name-<fingerprint>', with its own budget of trials, which a second run on it continues."""
    from dataclasses import replace

    from maas.studies import study_for_table
    from tasks.tune import open_storage

    first = run_study(objective(wine, tuning(n_trials=2)), tuning(n_trials=2), "grown", seed=0)
    grown = replace(wine, fingerprint="0123456789abcdef")
    other = run_study(objective(grown, tuning(n_trials=2)), tuning(n_trials=2), "grown", seed=0)
    assert first.study_name == "grown" and other.study_name == "grown-01234567"
    assert other.n_complete + other.n_pruned == 2 and len(states("grown-01234567", tuning())) == 2
    assert run_study(objective(grown, tuning(n_trials=3)), tuning(n_trials=3), "grown", seed=0).study_name == \
        "grown-01234567" and len(states("grown-01234567", tuning())) == 3
    assert run_study(objective(wine, tuning(n_trials=2)), tuning(n_trials=2), "grown", seed=0).study_name == "grown"
    assert len(states("grown", tuning())) == 2
    storage = open_storage(tuning())
    assert study_for_table(storage, "grown", wine.fingerprint) == "grown"  # what a tune-worker on the table joins
    assert study_for_table(storage, "grown", grown.fingerprint) == "grown-01234567"
    assert study_for_table(storage, "not-yet", grown.fingerprint) == "not-yet"


@STUDY
# the dead worker is played with study.ask(), which Optuna warns has no heartbeat thread (Study.optimize
# runs one); the flow itself never asks outside optimize
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_left_running_by_a_dead_process_is_failed_and_retried(wine, maas_home):
    import time

    from tasks.tune import open_storage

    config = tuning(n_trials=2, **CRASH)
    study = optuna.create_study(study_name="crash", storage=open_storage(config), direction="maximize")
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)})
    study._storage.record_heartbeat(orphan._trial_id)  # a worker that beat once, then died
    time.sleep(6)  # past the 5 s grace period
    result = run_study(objective(wine, config), config, "crash", seed=0)
    trials = optuna.load_study(study_name="crash", storage=open_storage(config)).trials
    assert trials[0].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == 0 for t in trials[1:])  # the retry of trial 0
    assert result.n_complete + result.n_pruned == 2


@STUDY
def test_pruning_stops_trials_in_a_bad_region(wine, maas_home):
    # Half the learning-rate range is far too small to learn in a few epochs: those trials lag.
    space = {"mlp": {"lr": {"low": 1e-7, "high": 3e-2, "log": True}}}
    config = tuning(n_trials=14, max_epochs=15, patience=15, sampler="random", **space)
    result = run_study(objective(wine, config), config, "prune", seed=3)
    assert result.n_pruned >= 2
    assert result.epochs_total < 14 * 15


@STUDY
def test_failing_trials_do_not_stop_the_study(wine, maas_home, monkeypatch):
    import tasks.tune as tune_module

    real_train = tune_module.train_on_data
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise FloatingPointError("training loss became nan")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train_on_data", flaky)
    config = tuning(n_trials=3, pruner="none")
    result = run_study(objective(wine, config), config, "flaky", seed=0)
    assert result.n_complete == 3 and result.n_failed >= 2


@STUDY
def test_every_trial_failing_is_a_clear_error(wine, maas_home):
    config = tuning(n_trials=3, max_failures=3, mlp={"batch_size": [0]})  # batch size 0 cannot train
    with pytest.raises(RuntimeError, match="no trial of study 'broken' completed"):
        run_study(objective(wine, config), config, "broken", seed=0)


@STUDY
def test_trials_are_child_runs_with_state_tags(wine, maas_home, tmp_path):
    client = mlflow_client()
    experiment_id = ensure_experiment(client, "tuned")
    config = tuning(n_trials=3, pruner="none")
    with parent_run(client, experiment_id, "parent", {}) as parent_id:
        run_study(objective(wine, config, tracked(client, experiment_id, parent_id, "children", tmp_path)), config, "children", 0)
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 3
    for child in children:
        assert child.data.tags["optuna.state"] == "complete" and child.info.status == "FINISHED"
        assert {"lr", "width", "depth"} <= set(child.data.params)
        assert len(client.get_metric_history(child.info.run_id, "val/f1_macro")) == int(child.data.metrics["epochs"])


@STUDY
def test_two_parallel_trials_finish_without_lock_errors(wine, maas_home, caplog, tmp_path):
    client = mlflow_client()
    experiment_id = ensure_experiment(client, "parallel")
    config = tuning(n_trials=6, n_jobs=2)
    with parent_run(client, experiment_id, "parent", {}) as parent_id:
        result = run_study(objective(wine, config, tracked(client, experiment_id, parent_id, "parallel", tmp_path)), config, "parallel", 0)
    assert result.n_complete + result.n_pruned == 6 and result.n_failed == 0
    assert "database is locked" not in caplog.text
    numbers = [t["trial"] for t in result.top_trials]
    assert len(numbers) == len(set(numbers))  # no trial (e.g. the enqueued baseline) ran twice
    assert not result.reproducible


@STUDY
def test_runs_starting_at_once_on_a_new_sqlite_study_file_all_open_it(tmp_path):
    """Each opener makes the schema if it is missing; on a new file four at once (runs started
    together, tuning workers) failed on the schema version's unique key (IntegrityError) in 4 of 5
    tries here, before the file lock beside the database."""
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'study-{attempt}.db'}"
        assert at_once(lambda: open_storage(TuningConfig(storage=url)).engine.dispose() or "opened") == ["opened"] * 4


def test_samplers_and_multi_objective(wine, maas_home):
    for sampler in ("random", "grid"):
        config = tuning(n_trials=2, sampler=sampler)
        assert run_study(objective(wine, config), config, f"s-{sampler}", 0).n_complete >= 1
    config = tuning(n_trials=4, objectives=["f1_macro", "size"])
    result = run_study(objective(wine, config), config, "pareto", 0)
    assert result.objectives == ["f1_macro", "size"] and result.pareto_front
    assert result.n_pruned == 0  # Optuna cannot prune multi-objective studies


def test_pareto_pick_takes_the_smallest_within_tolerance():
    trials = [optuna.trial.create_trial(values=[f1, size], params={}, distributions={})
              for f1, size in [(0.99, 900.0), (0.987, 300.0), (0.95, 100.0)]]
    assert pick_pareto_trial(trials, ["f1_macro", "size"], "smallest", 0.005).values == [0.987, 300.0]
    assert pick_pareto_trial(trials, ["f1_macro", "size"], "best_quality", 0.005).values == [0.99, 900.0]


def test_best_params_map_onto_the_configs():
    model, train = apply_hyperparameters(DEFAULTS, {
        "lr": 0.01, "weight_decay": 0.001, "dropout": 0.2, "batch_size": 32, "width": 64, "depth": 3})
    assert model.hidden_sizes == [64, 64, 64] and train.lr == 0.01 and train.batch_size == 32
    model, _ = apply_hyperparameters(DEFAULTS, {
        "lr": 0.01, "weight_decay": 0.001, "dropout": 0.2, "batch_size": 32, "width": 64, "channels": 8})
    assert model.cnn_channels == [8, 16]


@STUDY
def test_a_new_study_starts_from_the_configured_defaults(wine, maas_home):
    config = tuning(n_trials=2)
    run_study(objective(wine, config), config, "baseline", seed=0)
    from tasks.tune import open_storage

    first = optuna.load_study(study_name="baseline", storage=open_storage(config)).trials[0]
    assert first.params["lr"] == TrainConfig().lr and first.params["width"] == ModelConfig().hidden_sizes[0]


def test_grid_space_is_finite_and_the_storage_password_is_hidden():
    grid = grid_space("mlp", TuningConfig())
    assert len(grid["lr"]) == 3 and grid["depth"] == [1, 2, 3]
    assert "secret" not in redacted("postgresql://maas:secret@db:5432/optuna")


def test_tuning_config_errors_are_one_line():
    with pytest.raises(MaasInputError, match="tuning: set n_trials, timeout_s or both"):
        load_config(overrides=["tuning.n_trials=null"])


def finished(number: int, value: float, baseline: bool = False):
    trial = optuna.trial.create_trial(value=value, params={}, distributions={},
                                      user_attrs={BASELINE_ATTR: True} if baseline else {})
    trial.number = number
    return trial


@pytest.mark.parametrize("best, baseline, n_val, use_tuned", [
    (0.99, 0.98, 86, False),   # +1 pt on 86 rows: ~0.7 SE, noise
    (0.99, 0.90, 86, True),    # +9 pt: ~2.8 SE
    (1.00, 0.9927, 270, False),  # digits here: +0.7 pt = 1.4 SE
    (0.99, 0.98, 100_000, True),  # a large validation split resolves one point
])
def test_the_best_trial_replaces_the_defaults_only_when_clearly_better(best, baseline, n_val, use_tuned):
    decided, reason = tuned_or_default(finished(7, best), finished(0, baseline, True), n_val, min_gain_se=2.0)
    assert decided is use_tuned and "SE" in reason
    assert tuned_or_default(finished(7, 0.99), finished(0, 0.98, True), 86, min_gain_se=0)[0]  # 0: always the best
    assert not tuned_or_default(finished(0, 0.98, True), finished(0, 0.98, True), 86, 2.0)[0]


@STUDY
def test_bad_configured_settings_are_replaced_by_tuning(wine, maas_home):
    crippled = TrainConfig(lr=1e-4)  # inside the search space, far too slow for 6 epochs
    config = tuning(n_trials=6)
    result = run_study(Objective(wine, TrainingSettings(ModelConfig(), crippled), config, seed=0), config, "crippled", seed=0)
    assert result.baseline_value is not None and result.best_values[0] > result.baseline_value
    assert result.use_tuned, result.decision


@STUDY
def test_trials_in_two_processes_fill_the_budget_once_and_each_is_a_child_run(wine, maas_home, caplog, tmp_path):
    import sqlite3

    config = tuning(n_trials=8, workers=2, pruner="none", max_epochs=300, patience=300)
    with warm_worker_ahead(config):  # as the flow starts them, before its data stage
        ahead = {process.pid for process in tune_workers._started_ahead.processes}
        with sqlite3.connect(maas_home / "optuna.db") as made:  # the storage made ready before any study
            assert made.execute("SELECT count(*) FROM studies").fetchone() == (0,)
        trainers = two_processes_share_the_study(wine, config, caplog, tmp_path)
        assert tune_workers._started_ahead is None  # the study took them
    assert ahead < trainers  # the worker started ahead trained, not a new one


def test_of_two_trials_started_for_the_last_slot_the_later_numbered_yields():
    study = optuna.create_study()
    first, second, third = study.ask(), study.ask(), study.ask()  # two processes both saw one slot left
    assert not over_budget(first, 2) and not over_budget(second, 2) and over_budget(third, 2)
    assert not over_budget(third, None)  # no trial budget (timeout only): never surplus
    study.tell(first, state=TrialState.FAIL)  # a failed trial gives its slot back
    assert not over_budget(third, 2)
    study.tell(second, 0.9)
    third.set_user_attr(SURPLUS_ATTR, True)
    study.tell(third, state=TrialState.PRUNED)
    assert [spends_budget(t) for t in study.trials] == [False, True, False]


def test_workers_started_ahead_end_with_the_run_when_no_study_takes_them():
    with pytest.raises(RuntimeError), tune_workers.workers_ahead(1):
        processes = list(tune_workers._started_ahead.processes)
        assert all(process.is_alive() for process in processes)
        raise RuntimeError("the data stage failed")
    assert tune_workers._started_ahead is None and not any(process.is_alive() for process in processes)
    with tune_workers.workers_ahead(0):  # workers=1, or no network to tune: none started
        assert tune_workers._started_ahead is None


@STUDY
@pytest.mark.team
def test_trials_in_two_processes_share_one_study_on_postgresql(wine, maas_home, caplog, tmp_path, postgres_database):
    config = tuning(n_trials=8, workers=2, pruner="none", max_epochs=300, patience=300, storage=postgres_database)
    with warm_worker_ahead(config):
        two_processes_share_the_study(wine, config, caplog, tmp_path)


@contextmanager
def warm_worker_ahead(config: TuningConfig):
    """One worker started ahead, as the flow starts it (the run's study storage made ready and open
    in the worker), and ready: a cold one (imports take seconds under load) could find every trial
    taken by the run's process."""
    with tune_workers.workers_ahead(1, config):
        assert tune_workers._started_ahead.wait_warm(180)
        yield


def two_processes_share_the_study(wine, config: TuningConfig, caplog, tmp_path) -> set[int]:
    """The PIDs that trained the study's trials."""
    import os

    client = mlflow_client()
    experiment_id = ensure_experiment(client, "processes")
    with parent_run(client, experiment_id, "parent", {}) as parent_id:
        tracker = tracked(client, experiment_id, parent_id, "processes", tmp_path)
        result = run_study(objective(wine, config, tracker), config, "processes", 0)
    trials = optuna.load_study(study_name="processes", storage=open_storage_of(config)).trials
    assert spent_exactly(trials, 8)
    assert len({t.user_attrs["maas.owner"] for t in trials}) == 2  # both processes trained trials
    assert os.getpid() in {json_pid(t) for t in trials}
    assert trials[0].user_attrs.get(BASELINE_ATTR) and json_pid(trials[0]) == os.getpid()  # enqueued: the run's own
    assert "database is locked" not in caplog.text and not result.reproducible
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(int(child.data.tags["optuna.trial_number"]) for child in children) == [
        t.number for t in trials if spends_budget(t)]  # each trial once, from whichever process trained it
    return {json_pid(t) for t in trials}


@STUDY
def test_a_worker_killed_mid_trial_has_its_trial_failed_and_rerun_and_the_study_reaches_its_budget(wine, maas_home,
                                                                                                   caplog):
    import os
    import signal
    import threading
    import time

    config = tuning(n_trials=6, workers=2, pruner="none", max_epochs=300, patience=300)  # seconds per trial
    killed = {}
    study = optuna.create_study(study_name="killed", storage=open_storage_of(config), direction="maximize")

    def kill_the_worker_mid_trial():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                pid = json_pid(trial)
                if pid and pid != os.getpid():
                    time.sleep(0.5)  # into its epochs
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, trial=trial.number)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_mid_trial)
    with warm_worker_ahead(config):
        killer.start()
        result = run_study(objective(wine, config), config, "killed", 0)
    killer.join()
    assert killed, "no worker trial was seen running"
    assert_failed_and_rerun(config, killed["trial"], result)
    assert f"exit {-signal.SIGKILL}" in caplog.text and "failed and re-queued" in caplog.text


def assert_failed_and_rerun(config: TuningConfig, number: int, result) -> None:
    """Study 'killed': the killed worker's trial failed, re-run to completion, the budget of 6 reached.
    `number`: the trial seen running before the kill; the worker may have finished it and started the
    next by the time the kill landed (before that one had an owner or a heartbeat, once: a case the
    run now settles after the grace period), so the failed trial is that one or a later one."""
    trials = optuna.load_study(study_name="killed", storage=open_storage_of(config)).trials
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0] >= number
    assert any(t.system_attrs.get("failed_trial") == failed[0] and t.state == TrialState.COMPLETE for t in trials)
    assert result.n_complete + result.n_pruned == 6


def spent_exactly(trials, n_trials: int) -> bool:
    """The study's budget spent exactly: n_trials complete, none lost, none extra; a trial that two
    processes' race made one too many yielded before it trained (surplus, no params, no epochs)."""
    surplus = [t for t in trials if t.user_attrs.get(SURPLUS_ATTR)]
    assert all(t.state == TrialState.PRUNED and not t.params and not t.user_attrs.get("epochs") for t in surplus)
    return [t.state for t in trials].count(TrialState.COMPLETE) == n_trials == len(trials) - len(surplus)


def open_storage_of(config: TuningConfig):
    from tasks.tune import open_storage

    return open_storage(config)


def json_pid(trial) -> int | None:
    import json

    owner = trial.user_attrs.get("maas.owner")
    return int(json.loads(owner)["maas.pid"]) if owner else None


def has_heartbeat(storage: str, trial_id: int) -> bool:
    """Whether Optuna recorded a heartbeat of the trial in this SQLite storage: from then on its
    worker's death is seen by the heartbeat (a remote worker's only sign), whatever its PID says."""
    import sqlite3

    with closing(sqlite3.connect(storage.removeprefix("sqlite:///"))) as db:
        return db.execute("SELECT 1 FROM trial_heartbeats WHERE trial_id = ?", (trial_id,)).fetchone() is not None


def tune_worker(storage: str, study: str):
    """`maas tune-worker` as another host runs it: its own process and copy of the data; returned once
    it waits for the run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = subprocess.Popen([sys.executable, "-m", "maas", "tune-worker", "--dataset", "wine", "--study", study,
                               "--set", "seed=0", "--set", f"tuning.storage={storage}", "--wait", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2], env=dict(os.environ))
    line = worker.stdout.readline()
    if f"waiting for a run to open study '{study}'" not in line:
        worker.kill()
        raise AssertionError(line + worker.stderr.read())
    return worker


def a_remote_worker_shares_the_study(wine, storage: str, tmp_path) -> None:
    """The run's study found by name in the shared storage; the worker's trials' child runs written
    by the worker under the run's parent."""
    worker = tune_worker(storage, "remote")
    try:
        config = tuning(n_trials=8, remote_workers=True, pruner="none", max_epochs=300, patience=300, storage=storage)
        client = mlflow_client()
        experiment_id = ensure_experiment(client, "remote")
        with parent_run(client, experiment_id, "parent", {}) as parent_id:
            result = run_study(objective(wine, config, tracked(client, experiment_id, parent_id, "remote", tmp_path)),
                               config, "remote", 0)
        out, err = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    trials = optuna.load_study(study_name="remote", storage=open_storage_of(config)).trials
    by_worker = [t.number for t in trials if json_pid(t) == worker.pid]
    assert by_worker and f"{len(by_worker)} trial(s) trained here" in out
    assert spent_exactly(trials, 8) and result.n_complete == 8
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(int(child.data.tags["optuna.trial_number"]) for child in children) == [
        t.number for t in trials if spends_budget(t)]  # each trial once, from whichever process trained it
    assert "ERROR" not in err and "Traceback" not in err


@STUDY
def test_a_tune_worker_started_elsewhere_joins_the_runs_study_and_writes_its_trials_child_runs(wine, maas_home,
                                                                                                tmp_path):
    a_remote_worker_shares_the_study(wine, f"sqlite:///{tmp_path / 'shared-optuna.db'}", tmp_path)


@STUDY
@pytest.mark.team
def test_a_tune_worker_joins_a_study_on_postgresql(wine, maas_home, tmp_path, postgres_database):
    a_remote_worker_shares_the_study(wine, postgres_database, tmp_path)


@STUDY
def test_a_tune_worker_killed_mid_trial_has_its_trial_failed_by_heartbeat_and_rerun(wine, maas_home, tmp_path,
                                                                                    caplog):
    """A remote worker's death shows only as its trial's silent heartbeat (its PID means nothing
    here): the run fails the trial, re-queues it and still reaches its budget."""
    import os
    import signal
    import threading
    import time

    storage = f"sqlite:///{tmp_path / 'shared-optuna.db'}"
    config = tuning(n_trials=6, remote_workers=True, pruner="none", max_epochs=300, patience=300, storage=storage,
                    **CRASH)
    worker = tune_worker(storage, "killed")  # the run's heartbeat settings reach it with the study
    killed = {}

    def kill_the_worker_mid_trial():
        study, deadline = None, time.time() + 120
        while time.time() < deadline and not killed:
            try:
                study = study or optuna.load_study(study_name="killed", storage=open_storage_of(config))
            except KeyError:
                time.sleep(0.2)
                continue
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if json_pid(trial) == worker.pid and has_heartbeat(storage, trial._trial_id):
                    # at once: a fixed wait let a fast CPU finish every wine trial first ("no trial ... seen running")
                    os.kill(worker.pid, signal.SIGKILL)
                    killed.update(trial=trial.number)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_mid_trial)
    killer.start()
    try:
        result = run_study(objective(wine, config), config, "killed", 0)
    finally:
        killer.join()
        worker.kill()
        worker.wait()
    assert killed, "no trial of the worker was seen running"
    assert_failed_and_rerun(config, killed["trial"], result)


def test_a_tune_worker_refuses_data_that_is_not_the_runs(wine, maas_home, tmp_path):
    import json
    import subprocess
    import sys

    from tasks.tune_workers import StudyJob, publish_job

    storage = f"sqlite:///{tmp_path / 'shared-optuna.db'}"
    config = tuning(n_trials=2, remote_workers=True, storage=storage)
    study = optuna.create_study(study_name="remote", storage=open_storage_of(config), direction="maximize")
    publish_job(study, StudyJob(wine, DEFAULTS, config, 0, "remote", float("inf")), None)
    assert "password" not in json.dumps(study.user_attrs) and "storage" not in study.user_attrs["maas.job"]["tuning"]
    done = subprocess.run([sys.executable, "-m", "maas", "tune-worker", "--dataset", "wine", "--study", "remote",
                           "--set", "seed=0", "--set", "data.val_fraction=0.3", "--set", f"tuning.storage={storage}"],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("maas: error: tune-worker: the data here (") and lines[0].endswith(
        "does not give the run's training and validation rows: give the run's dataset, target and data settings")


@STUDY
def test_a_study_whose_opening_took_all_its_time_still_trains_its_first_trial(wine, maas_home, monkeypatch):
    """Opening the study counts against timeout_s; when it took all of it (busy cores), the first
    trial still runs, stopped after its first epoch past the time, rather than the run failing with
    no trial."""
    import time

    import tasks.tune as tune_module

    open_study = tune_module.open_study
    monkeypatch.setattr(tune_module, "open_study", lambda *args: time.sleep(1.2) or open_study(*args))
    endless = tuning(n_trials=3, max_epochs=3000, patience=3000, timeout_s=1, pruner="none")
    result = run_study(objective(wine, endless), endless, "slow-open", seed=0)
    study = optuna.load_study(study_name="slow-open", storage=open_storage(endless))
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE], study.trials  # one, then time is up
    assert 0 < study.trials[0].user_attrs["epochs"] < 3000 and result.n_complete == 1


@STUDY
def test_a_trial_still_training_at_the_studys_timeout_stops_there(wine, maas_home):
    """Optuna's timeout starts no new trial; the trial in flight stops at its best epoch so far, as a
    network does at train.max_seconds, instead of running its epochs out past the run's budget."""
    endless = tuning(n_trials=1, max_epochs=3000, patience=3000, timeout_s=1, pruner="none")
    run_study(objective(wine, endless), endless, "timeout", seed=0)
    study = optuna.load_study(study_name="timeout", storage=open_storage(endless))
    [trial] = study.trials
    assert trial.state == TrialState.COMPLETE and 0 < trial.user_attrs["epochs"] < 3000, trial.user_attrs
    unbounded = objective(wine, tuning())
    assert unbounded.seconds_left(None) is None and unbounded.seconds_left(5.0) == 5.0  # no study end: as configured
