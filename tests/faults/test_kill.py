"""SIGKILL at the worst moments; after each, the next command succeeds, says what it settled in one
line, and leaves nothing RUNNING and no version half-made.

The kills come from tests/faults/crash.py, inside the process, at an exact spot each time."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys

import pytest

from maas.tracking import mlflow_client
from tasks.recovery import REGISTRATION_TAG, running_runs
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

# The network only: the training stage to kill is the network's (a scikit-learn family has none).
QUICK = ["--config", str(PROJECT_ROOT / "configs" / "quick.yaml"), "--dataset", "wine",
         "--set", "serving.build_bento=false", "--set", "model.families=[network]"]


@pytest.fixture
def env(tmp_path, prefect_server, monkeypatch):
    """A fresh MAAS_HOME for the commands and for this test's own look at the store."""
    home = tmp_path / "home"
    monkeypatch.setenv("MAAS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return {**os.environ, "MAAS_HOME": str(home), "PREFECT_API_URL": prefect_server, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(PROJECT_ROOT)}


def maas(env, *arguments: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT_ROOT / "tests" / "faults" / "crash.py"), crash_at] if crash_at else \
        [sys.executable, "-m", "maas"]
    return subprocess.run([*command, *arguments], env=env, capture_output=True, text=True, timeout=600,
                          cwd=PROJECT_ROOT)


def assert_killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, (done.returncode, (done.stdout + done.stderr)[-2000:])


def assert_clean_success(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "ERROR" not in output and "Traceback" not in output, output[-3000:]
    return output


def settled(home) -> dict:
    """What a crash could leave behind, as found in the stores."""
    import optuna

    client = mlflow_client()
    pending = client.search_model_versions(f"tags.`{REGISTRATION_TAG}` = 'pending'")
    running_trials = []
    if (home / "optuna.db").exists():
        storage = optuna.storages.RDBStorage(f"sqlite:///{home / 'optuna.db'}")
        for study in storage.get_all_studies():
            running_trials += [trial.number for trial in storage.get_all_trials(
                study._study_id, states=(optuna.trial.TrialState.RUNNING,))]
    return {"running runs": [run.info.run_name for run in running_runs(client)],
            "pending versions": [f"{version.name}/{version.version}" for version in pending],
            "running trials": running_trials}


NOTHING_LEFT = {"running runs": [], "pending versions": [], "running trials": []}


@pytest.mark.parametrize("point, left_behind, said", [
    ("tuning", {"running runs", "running trials"}, "Optuna trial(s) maas-wine #1 of a dead process failed and re-queued"),
    ("training", {"running runs"}, "MLflow run(s) left RUNNING marked KILLED"),
    ("registration", {"running runs", "pending versions"}, "half-registered version(s) maas-wine/1 deleted"),
])
def test_a_run_killed_mid_stage_is_settled_by_the_next_run(point, left_behind, said, env):
    home = env["MAAS_HOME"]
    assert_killed(maas(env, "run", *QUICK, crash_at=point))
    before = settled(Path(home))
    assert {what for what, found in before.items() if found} == left_behind, before
    output = assert_clean_success(maas(env, "run", *QUICK))
    recovered = [line for line in output.splitlines() if "recovered from a crash" in line]
    assert recovered and any(said in line for line in recovered), output[-3000:]
    assert settled(Path(home)) == NOTHING_LEFT
    client = mlflow_client()
    killed = client.search_runs([client.get_experiment_by_name("maas-wine").experiment_id],
                                "attributes.status = 'KILLED'")
    assert killed and all("maas.crash" in run.data.tags for run in killed)
    champion = client.get_model_version_by_alias("maas-wine", "champion")
    assert champion.tags[REGISTRATION_TAG] == "complete"


def test_a_monitor_check_killed_mid_write_is_settled_by_the_next_check(env):

    assert_clean_success(maas(env, "run", *QUICK))
    watch = ["--set", "monitoring.model=maas-wine@champion"]
    assert_killed(maas(env, "monitor", *watch, crash_at="monitoring"))
    assert settled(Path(env["MAAS_HOME"]))["running runs"], "the check's run should be left RUNNING by the kill"
    output = assert_clean_success(maas(env, "monitor", *watch))
    assert "recovered from a crash" in output
    assert settled(Path(env["MAAS_HOME"])) == NOTHING_LEFT
