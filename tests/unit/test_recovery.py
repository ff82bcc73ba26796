"""What a crashed run leaves is settled by the next one; what a live run holds is left alone."""

from __future__ import annotations

import json

import optuna
import pytest

from maas.processes import process_owner
from maas.tracking import ensure_experiment, mlflow_client
from tasks.recovery import CRASH_TAG, REGISTRATION_TAG, TRIAL_OWNER_ATTR, fail_trials_of_dead_owners, recover

DEAD = {**process_owner(), "maas.pid": "999999"}


@pytest.fixture
def client(maas_home):
    return mlflow_client()


def test_runs_of_dead_processes_are_killed_and_live_or_foreign_ones_left(client):
    experiment = ensure_experiment(client, "maas-crash")
    crashed = client.create_run(experiment, run_name="crashed", tags=DEAD).info.run_id
    child = client.create_run(experiment, run_name="trial-3", tags={"mlflow.parentRunId": crashed}).info.run_id
    live = client.create_run(experiment, run_name="live", tags=process_owner()).info.run_id
    notebook = client.create_run(experiment, run_name="notebook").info.run_id
    recovery = recover(client)
    status = {run_id: client.get_run(run_id).info.status for run_id in (crashed, child, live, notebook)}
    assert status == {crashed: "KILLED", child: "KILLED", live: "RUNNING", notebook: "RUNNING"}
    assert "process 999999 is gone" in client.get_run(crashed).data.tags[CRASH_TAG]
    line = recovery.line()
    assert "2 MLflow run(s) left RUNNING marked KILLED" in line and "\n" not in line
    assert not recover(client)  # nothing the second time


def test_a_version_without_its_alias_is_deleted_and_one_with_it_finished(client):
    experiment = ensure_experiment(client, "maas-crash")
    run_id = client.create_run(experiment, tags=DEAD).info.run_id
    client.create_registered_model("maas-crash")
    pending = {REGISTRATION_TAG: "pending"}
    half = client.create_model_version("maas-crash", "file:///nowhere", run_id=run_id, tags=pending).version
    aliased = client.create_model_version("maas-crash", "file:///nowhere", run_id=run_id, tags=pending).version
    client.set_registered_model_alias("maas-crash", "champion", aliased)
    recovery = recover(client)
    assert recovery.deleted_versions == [f"maas-crash/{half}"] and recovery.finished_versions == [f"maas-crash/{aliased}"]
    (left,) = client.search_model_versions("name = 'maas-crash'")
    assert left.version == aliased and left.tags[REGISTRATION_TAG] == "complete"


def test_a_version_being_registered_by_a_live_run_is_left_alone(client):
    experiment = ensure_experiment(client, "maas-crash")
    run_id = client.create_run(experiment, tags=process_owner()).info.run_id
    client.create_registered_model("maas-live")
    client.create_model_version("maas-live", "file:///nowhere", run_id=run_id, tags={REGISTRATION_TAG: "pending"})
    assert not recover(client)
    assert len(client.search_model_versions("name = 'maas-live'")) == 1


def test_a_trial_of_a_dead_process_is_failed_and_requeued(maas_home):
    maas_home.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{maas_home}/optuna.db", study_name="s")
    dead_trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1)})
    dead_trial.set_user_attr(TRIAL_OWNER_ATTR, json.dumps(DEAD))
    live_trial = study.ask()
    live_trial.set_user_attr(TRIAL_OWNER_ATTR, json.dumps(process_owner()))
    assert fail_trials_of_dead_owners(study, max_retry=1) == [f"s #{dead_trial.number}"]
    states = [trial.state for trial in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING]
    assert study.get_trials()[2].params == dead_trial.params  # the retry trains the same settings


def test_a_trial_that_never_got_an_owner_is_failed_and_requeued_after_the_grace_period(maas_home):
    """A worker killed between Optuna creating its trial and the objective's first line: no owner,
    no heartbeat row, so Optuna's stale check skips it; past the grace period it is failed and retried."""
    import time

    maas_home.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{maas_home}/optuna.db", study_name="s")
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1)})
    time.sleep(0.05)
    assert fail_trials_of_dead_owners(study, max_retry=1) == []  # without a grace period: left alone
    assert fail_trials_of_dead_owners(study, max_retry=1, unowned_after_s=60) == []  # still within it
    assert fail_trials_of_dead_owners(study, max_retry=1, unowned_after_s=0.01) == [f"s #{orphan.number}"]
    states = [trial.state for trial in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.get_trials()[1].params == orphan.params
