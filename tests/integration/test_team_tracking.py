"""The team set-up for real: `maas tracking-server` on a PostgreSQL database with proxied
artifacts; training, the registry's aliases and the gate, the pyfunc model and `maas serve` all
go through its URL, and nothing is written to a local MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, free_port, quick_config, wait_until_up

pytestmark = [pytest.mark.slow, pytest.mark.team]


@pytest.fixture
def tracking_server(postgres_database, tmp_path):
    """(url, artifacts folder, database URL) of a running `maas tracking-server`."""
    port, artifacts = free_port(), tmp_path / "server-artifacts"
    log = open(tmp_path / "tracking-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "maas", "tracking-server", "--backend-store-uri", postgres_database,
                               "--artifacts-destination", str(artifacts), "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", 120, server)
        yield url, artifacts, postgres_database
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_a_run_registers_gates_and_serves_through_the_tracking_server(tracking_server, prefect_server, maas_home,
                                                                      monkeypatch):
    import mlflow
    import psycopg

    from flows.train_pipeline import train_pipeline
    from maas.api_keys import create_key
    from maas.service_store import connect
    from maas.tracking import mlflow_client

    url, artifacts, database = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    first = train_pipeline(quick_config("wine", "serving.build_bento=false")).to_dict()
    second = train_pipeline(quick_config("wine", "serving.build_bento=false", "tuning.enabled=false",
                                         "train.max_epochs=1")).to_dict()
    assert (first["model_version"], first["alias"]) == ("1", "champion") and second["model_version"] == "2"
    client = mlflow_client()
    assert client.get_model_version_by_alias("maas-wine", "champion").version in ("1", "2")
    assert {second["alias"]} <= {"champion", "challenger"}  # the gate ran against the server's champion
    # the runs are in PostgreSQL and the artifacts behind the server; no local MLflow store was made
    with psycopg.connect(database.replace("+psycopg", "")) as connection:
        assert connection.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0] >= 2
    assert any(artifacts.rglob("model.onnx"))
    assert not (maas_home / "mlflow.db").exists() and not (maas_home / "mlruns").exists()
    assert not any(maas_home.rglob("MLmodel")) or all("bentoml" in str(path) for path in maas_home.rglob("MLmodel"))

    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).data.head(5)
    predicted = mlflow.pyfunc.load_model("models:/maas-wine@champion").predict(frame)
    assert len(predicted) == 5

    _, key = create_key(connect(maas_home / "service.db"), "team", "pro")
    port = free_port()
    env = {**os.environ, "MAAS_HOME": str(maas_home), "MLFLOW_TRACKING_URI": url}
    serve = subprocess.Popen([sys.executable, "-m", "maas", "serve", "--model", "maas-wine@champion", "--port", str(port),
                              "--set", "serving.workers=1"], env=env, cwd=PROJECT_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", 120, serve)
        rows = pd.DataFrame(frame).to_dict(orient="records")
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"rows": rows}, headers={"X-API-Key": key}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()) == 5
        champion = client.get_model_version_by_alias("maas-wine", "champion").version
        assert answer.headers["x-maas-model"] == f"maas-wine/{champion}@champion"
    finally:
        serve.terminate()
        serve.wait(timeout=60)


def test_the_study_lives_in_postgresql_and_a_second_run_resumes_it(postgres_database, prefect_server, maas_home):
    import optuna

    from flows.train_pipeline import train_pipeline

    overrides = ("serving.build_bento=false", f"tuning.storage={postgres_database}", "tuning.n_trials=3")
    first = train_pipeline(quick_config("wine", *overrides)).to_dict()
    study = optuna.load_study(study_name="maas-wine", storage=postgres_database)
    assert first["tuning"]["n_complete"] == 3 and len(study.trials) == 3
    assert first["tuning"]["study"] == "maas-wine"
    train_pipeline(quick_config("wine", *overrides, "tuning.n_trials=5"))  # the same study, two trials more
    states = [trial.state for trial in optuna.load_study(study_name="maas-wine", storage=postgres_database).trials]
    assert len(states) == 5 and all(state == optuna.trial.TrialState.COMPLETE for state in states)
    assert not (maas_home / "optuna.db").exists()  # nothing of the study in the local store


def test_the_monitor_checks_and_rolls_back_through_the_tracking_server(tracking_server, prefect_server, maas_home,
                                                                       tmp_path, monkeypatch):
    import psycopg

    from flows.monitor import monitor
    from flows.train_pipeline import train_pipeline
    from maas.tracking import mlflow_client
    from tasks.data import prepare_data
    from tests.integration.test_monitor_flow import QUICK, log_as_service, served_model

    url, _, database = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MAAS_STORE_URL", database)  # the prediction log in PostgreSQL too: nothing local
    weak = train_pipeline(quick_config("breast_cancer", *QUICK, "tuning.enabled=false", "train.max_epochs=1",
                                       "model.hidden_sizes=[1]", "train.lr=0.0003", "model.family=mlp")).to_dict()
    config = quick_config("breast_cancer", *QUICK)
    strong = train_pipeline(config).to_dict()
    assert (weak["model_version"], strong["model_version"], strong["alias"]) == ("1", "2", "champion"), strong["gate"]
    from maas.service_store import connect

    rows = prepare_data(config.data, config.seed).splits.x_test
    ids = log_as_service(connect(), config, rows, version="2")
    labels_path = tmp_path / "labels.csv"  # ground truth the old champion matches: v2 is worse live
    pd.DataFrame({"request_id": ids, "label": served_model(config, "1").predict(rows)["label"]}).to_csv(labels_path,
                                                                                                      index=False)
    watched = config.model_copy(update={"monitoring": config.monitoring.model_copy(
        update={"labels_path": str(labels_path), "rollback_margin": 0.0, "retrain": False})})
    summary = monitor(watched).to_dict()
    assert summary["rollback"]["roll_back"], summary["rollback"]
    client = mlflow_client()
    assert str(client.get_model_version_by_alias(config.model_name, "champion").version) == "1"
    with psycopg.connect(database.replace("+psycopg", "")) as connection:  # the check's run and the alias, on the server
        assert connection.execute("select count(*) from runs where name like 'check-%' and status = 'FINISHED'"
                                  ).fetchone()[0] >= 1
        assert connection.execute("select version from registered_model_aliases where alias = 'champion'"
                                  ).fetchone()[0] == 1
        assert connection.execute("select count(*) from predictions").fetchone()[0] == len(rows)
    assert not (maas_home / "mlflow.db").exists() and not (maas_home / "service.db").exists()
