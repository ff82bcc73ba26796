"""The parent run always ends: no run is ever left RUNNING, whatever happens inside it; what stages
record goes through the run context in batched writes, timed apart from their compute."""

import time

import pytest

from maas.run_context import RunContext, StageTimer
from maas.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment, flatten, mlflow_client, mlflow_key,
                           parent_run)


@pytest.fixture(scope="module")
def store_home(tmp_path_factory):
    """One MLflow store for the module (creating one costs ~2 s); each test uses its own experiments."""
    from tests.conftest import module_home

    with module_home(tmp_path_factory) as home:
        yield home


@pytest.fixture
def client(store_home, monkeypatch):
    monkeypatch.setenv("MAAS_HOME", str(store_home))
    return mlflow_client()


def run_status(client, experiment_id):
    (run,) = client.search_runs([experiment_id])
    return run.info.status


def test_finished_failed_and_killed(client):
    for name, error, status in [("ok", None, "FINISHED"), ("bug", ValueError, "FAILED"), ("ctrl-c", KeyboardInterrupt, "KILLED")]:
        experiment_id = ensure_experiment(client, name)
        if error is None:
            with parent_run(client, experiment_id, name, {}):
                pass
        else:
            with pytest.raises(error), parent_run(client, experiment_id, name, {}):
                raise error()
        assert run_status(client, experiment_id) == status


def test_experiment_artifacts_live_under_maas_home(client, store_home):
    experiment = client.get_experiment(ensure_experiment(client, "where"))
    assert experiment.artifact_location.startswith((store_home / "mlartifacts").as_uri())
    assert ensure_experiment(client, "where") == experiment.experiment_id


def test_experiments_open_on_their_runs_in_the_mlflow_ui(client):
    """MLflow 3 shows an unmarked experiment as GenAI (traces); ours are model development."""
    assert client.get_experiment(ensure_experiment(client, "kind")).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    older = client.create_experiment("made-elsewhere")
    assert ensure_experiment(client, "made-elsewhere") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_record_writes_series_params_and_tags_past_mlflows_batch_limits(client, tmp_path):
    experiment_id = ensure_experiment(client, "batched")
    with parent_run(client, experiment_id, "b", {}) as run_id:
        ctx = RunContext(client, run_id, experiment_id, tmp_path)
        ctx.record(metrics={"final": 1.0}, params={f"p{i}": i for i in range(150)}, tags={"t": "x" * 6000},
                   series=[(step, {"a": step, "b": -step, "c": 0.5}) for step in range(1, 401)])
        ctx.describe("what happened")
    run = client.get_run(run_id)
    assert len(run.data.params) == 150 and run.data.metrics["final"] == 1.0 and len(run.data.tags["t"]) == 5000
    assert sorted(m.step for m in client.get_metric_history(run_id, "b")) == list(range(1, 401))
    assert run.data.tags["mlflow.note.content"] == "what happened"


def test_column_names_in_metric_and_param_names_are_made_ones_mlflow_takes(client, tmp_path):
    """A drift figure per column ("drift/psi/Price ($)", "drift/psi/message [tokens]") and a privacy
    rule per column in the flattened config: one name MLflow refuses used to fail the whole batch."""
    experiment_id = ensure_experiment(client, "names")
    names = ["Price ($)", "message [tokens]", "rate%", "a/b", "x/", "..", "Température", "#items, total"]
    with parent_run(client, experiment_id, "n", {}) as run_id:
        RunContext(client, run_id, experiment_id, tmp_path).record(
            metrics={f"drift/psi/{name}": float(index) for index, name in enumerate(names)},
            params={f"serving.privacy.columns.{name}": "hash" for name in names})
    run = client.get_run(run_id)
    assert run.data.metrics["drift/psi/Price ___"] == 0.0 and run.data.metrics["drift/psi/message _tokens_"] == 1.0
    assert run.data.metrics["drift/psi/a/b"] == 3.0 and run.data.metrics["drift/psi/x/_"] == 4.0
    assert run.data.metrics["drift/psi/Température"] == 6.0 and len(run.data.metrics) == len(names)
    assert run.data.params["serving.privacy.columns.Price ___"] == "hash" and len(run.data.params) == len(names)
    assert mlflow_key("x" * 400) == "x" * 250


def test_stage_timer_keeps_recording_apart_from_compute():
    timer = StageTimer()

    def work():
        time.sleep(0.05)
        with timer.recording("tune"):  # e.g. a trial's child run, written while the study runs
            time.sleep(0.1)

    timer.run("tune", work)
    assert 0.04 < timer.compute["tune"] < 0.09 and 0.09 < timer.record["tune"] < 0.15


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}


def test_passwords_in_urls_never_reach_mlflow_params():
    from maas.tracking import flatten, redact_passwords
    from maas.config import RunConfig

    config = RunConfig.model_validate({"tuning": {"storage": "postgresql+psycopg://optuna:hunter2@db:5432/optuna"},
                                       "serving": {"redis_url": "redis://:s3cret@cache:6379/0"}})
    params = redact_passwords(flatten(config.model_dump(mode="json")))
    assert params["tuning.storage"] == "postgresql+psycopg://optuna:***@db:5432/optuna"
    assert params["serving.redis_url"] == "redis://:***@cache:6379/0"
    assert "hunter2" not in str(params) and "s3cret" not in str(params)
    assert params["serving.limits_backend"] == "local" and params["train.lr"] == config.train.lr


def test_runs_starting_at_once_on_a_new_maas_home_all_open_its_mlflow_store(tmp_path, monkeypatch):
    """MLflow makes or migrates a SQLite store's tables when a process first opens it: four at once
    on a new file failed ("duplicate column name: step") in 4 of 4 tries here, before the lock."""
    from tests.conftest import at_once

    for attempt in range(2):
        monkeypatch.setenv("MAAS_HOME", str(tmp_path / f"home-{attempt}"))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert at_once(lambda: mlflow_client().search_experiments() and "opened") == ["opened"] * 4
