"""The monitoring flow for real: a registered champion, a prediction log written as the service
writes it, the MLflow monitoring experiment, a Prefect notification block posting to a local
webhook, rollback in the registry, and the cron deployments served by `maas schedule`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, interruptible, module_home, quick_config

pytestmark = pytest.mark.slow

QUICK = ("serving.build_bento=false", "compression.variants=[fp32]")


@pytest.fixture(scope="module")
def registry(prefect_server, tmp_path_factory):
    """(home, config, prepared data) with v1 (a deliberately weak network) replaced by v2 as champion."""
    from flows.train_pipeline import train_pipeline
    from tasks.data import prepare_data

    with module_home(tmp_path_factory) as home:
        weak = train_pipeline(quick_config("breast_cancer", *QUICK, "tuning.enabled=false", "train.max_epochs=1",
                                           "model.hidden_sizes=[1]", "train.lr=0.0003", "model.family=mlp")).to_dict()
        config = quick_config("breast_cancer", *QUICK)
        strong = train_pipeline(config).to_dict()
        assert (weak["model_version"], strong["model_version"], strong["alias"]) == ("1", "2", "champion"), strong["gate"]
        prepared = prepare_data(config.data, config.seed)
        yield home, config, prepared


@pytest.fixture
def fresh_log(registry, monkeypatch):
    """An empty prediction log and monitor state; the champion back on v2."""
    from maas.service_store import connect
    from maas.tracking import mlflow_client

    home, config, prepared = registry
    monkeypatch.setenv("MAAS_HOME", str(home))
    connection = connect()
    with connection:
        for table in ("predictions", "monitor_checks", "incidents"):
            connection.execute(f"DELETE FROM {table}")
    mlflow_client().set_registered_model_alias(config.model_name, "champion", "2")
    return connection


def served_model(config, version: str):
    from maas.bundle import ModelBundle
    from maas.tracking import mlflow_client
    from maas.registered import ModelRef, download_bundle

    mlflow_client()
    import tempfile

    return ModelBundle.load(download_bundle(ModelRef(config.model_name, version=version), tempfile.mkdtemp()))


def log_as_service(connection, config, rows: pd.DataFrame, version: str = "2") -> list[str]:
    """One request per row, logged in the service's format (maas/service_store.py); returns request ids."""
    from maas.service_store import log_predictions

    predictions = served_model(config, version).predict(rows)
    ids = [uuid.uuid4().hex for _ in range(len(rows))]
    now = time.time()
    entries = [
        (request_id, now, "key", f"{config.model_name}/{version}@champion", 200, json.dumps({"rows": [row]}),
         json.dumps([{"label": label, "probabilities": {}}]))
        for request_id, row, label in zip(ids, rows.to_dict(orient="records"), predictions["label"])
    ]
    log_predictions(connection, entries)
    return ids


def shifted(prepared, columns=("mean radius", "mean texture", "worst area")) -> pd.DataFrame:
    rows = prepared.splits.x_test.copy()
    for column in columns:
        rows[column] = rows[column] + prepared.splits.x_train[column].std()
    return rows


class Webhook:
    """A local HTTP endpoint that records what a Prefect notification block posts to it."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def test_unchanged_rows_raise_no_alert_and_the_check_is_an_mlflow_run(registry, fresh_log):
    from flows.monitor import monitor
    from maas.tracking import mlflow_client

    home, config, prepared = registry
    log_as_service(fresh_log, config, prepared.splits.x_test)
    summary = monitor(config).to_dict()
    assert summary["model"] == f"{config.model_name}/2@champion"
    assert summary["drift"]["n_rows"] == len(prepared.splits.x_test) and summary["drift"]["judged"]
    assert summary["drift"]["drifted_features"] == [] and summary["alerts"] == [] and summary["retrain"] is None
    run = mlflow_client().get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["drift/share"] == 0
    artifacts = {item.path for item in mlflow_client().list_artifacts(run.info.run_id, "drift")}
    assert {"drift/report.html", "drift/drift.png"} <= artifacts
    from tests.conftest import flow_run_artifacts

    assert {"monitoring-report", "drift-features"} <= set(flow_run_artifacts(summary["prefect_flow_run_id"]))
    again = monitor(config).to_dict()  # the next check starts where this one ended
    assert again["drift"]["n_rows"] == 0 and not again["drift"]["judged"]


def test_drift_alerts_once_per_incident_through_the_notification_block(registry, fresh_log):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.monitor import monitor

    home, config, prepared = registry
    webhook = Webhook()
    CustomWebhookNotificationBlock(name="maas-test", url=webhook.url, allow_private_urls=True,
                                   json_data={"text": "{{subject}}: {{body}}"}).save("maas-test-ops", overwrite=True)
    watched = config.model_copy(update={"monitoring": config.monitoring.model_copy(
        update={"notify_block": "custom-webhook/maas-test-ops", "retrain_deployment": "maas-train/not-registered"})})
    log_as_service(fresh_log, config, shifted(prepared))
    first = monitor(watched).to_dict()
    assert sorted(first["drift"]["drifted_features"]) == ["mean radius", "mean texture", "worst area"]
    assert [alert["kind"] for alert in first["alerts"]] == ["drift"] and first["alerts_delivered"] == 1
    assert len(webhook.received) == 1 and "drift" in webhook.received[0]["text"]
    assert "not registered" in first["retrain"]["status"] and first["retrain"]["flow_run_id"] is None

    log_as_service(fresh_log, config, shifted(prepared))
    second = monitor(watched).to_dict()
    assert second["drift"]["drifted_features"] and second["alerts"] == [] and len(webhook.received) == 1


def test_a_misspelt_notification_block_is_told_on_a_check_without_alerts(prefect_server, caplog):
    """Found on the first check, not on the day an alert cannot be delivered."""
    import logging

    from tasks.alerts import send_alerts

    with caplog.at_level(logging.WARNING, logger="maas.test.alerts"):
        delivered = send_alerts([], "maas-demo", "custom-webhook/no-such-block", logging.getLogger("maas.test.alerts"))
    assert delivered == 0 and "notification block 'custom-webhook/no-such-block' not loaded" in caplog.text


def test_a_monitor_watching_another_model_records_and_retrains_it_as_its_own_config_would(registry, fresh_log,
                                                                                          tmp_path):
    from types import SimpleNamespace

    from maas.tracking import mlflow_client
    from tasks.check import monitoring_experiment, resolve_watched
    from tasks.retrain import training_config

    home, config, prepared = registry
    # `maas monitor --set monitoring.model=...` with no --config: the monitor's own data section is another table's
    other = quick_config("wine", *QUICK, f"monitoring.model={config.model_name}@champion")
    watched = resolve_watched(mlflow_client(), other, tmp_path)
    trained = training_config(SimpleNamespace(config=other, watched=watched))
    assert trained.data.dataset == "breast_cancer" and trained.model_dump() == config.model_dump()
    assert trained.train_deployment == f"maas-train/{config.model_name}-train" != other.train_deployment
    named = other.model_copy(update={"monitoring": other.monitoring.model_copy(update={"retrain_deployment": "a/b"})})
    assert training_config(SimpleNamespace(config=named, watched=watched)).train_deployment == "a/b"
    assert training_config(SimpleNamespace(config=config, watched=watched)) is config  # its own model: its own config
    assert monitoring_experiment(other, watched.ref.name) == f"{config.model_name}-monitoring" == \
        monitoring_experiment(config, watched.ref.name)  # its checks are recorded beside its own, not wine's


def test_decayed_labels_raise_a_quality_alert(registry, fresh_log, tmp_path):
    from flows.monitor import monitor

    home, config, prepared = registry
    rows = prepared.splits.x_test
    ids = log_as_service(fresh_log, config, rows)
    truth = np.asarray(prepared.labels, dtype=object)[prepared.splits.y_test].copy()
    flip = np.random.default_rng(0).random(len(truth)) < 0.3  # ground truth that no longer matches
    truth[flip] = np.where(truth[flip] == prepared.labels[0], prepared.labels[1], prepared.labels[0])
    labels_path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ids, "label": truth}).to_csv(labels_path, index=False)
    decayed = config.model_copy(update={"monitoring": config.monitoring.model_copy(
        update={"labels_path": str(labels_path), "rollback": False, "retrain": False})})
    summary = monitor(decayed).to_dict()
    quality = summary["quality"]
    assert quality["n_labelled"] == len(rows) and quality["judged"]
    assert quality["f1_drop"] > 0.05 and [alert["kind"] for alert in summary["alerts"]] == ["quality"]


def test_a_new_champion_worse_live_than_the_one_it_replaced_is_rolled_back(registry, fresh_log, tmp_path):
    from flows.monitor import monitor
    from maas.tracking import mlflow_client

    home, config, prepared = registry
    rows = prepared.splits.x_test
    ids = log_as_service(fresh_log, config, rows, version="2")
    old_labels = served_model(config, "1").predict(rows)["label"]  # ground truth that the old champion matches
    labels_path = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ids, "label": old_labels}).to_csv(labels_path, index=False)
    watched = config.model_copy(update={"monitoring": config.monitoring.model_copy(
        update={"labels_path": str(labels_path), "rollback_margin": 0.0, "retrain": False})})
    summary = monitor(watched).to_dict()
    assert summary["rollback"]["roll_back"], summary["rollback"]
    assert "rollback" in [alert["kind"] for alert in summary["alerts"]]
    client = mlflow_client()
    assert str(client.get_model_version_by_alias(config.model_name, "champion").version) == "1"
    assert "rolled_back" in client.get_model_version(config.model_name, "2").tags
    from maas import audit

    last = audit.entries(fresh_log, "alias.rollback")[-1]
    assert (last.actor, last.before, last.after) == ("monitoring flow", "v2", "v1") and "live F1" in last.reason


def test_the_monitor_purges_logged_inputs_past_their_retention(registry, fresh_log):
    from flows.monitor import monitor
    from maas import audit
    from maas.service_store import read_predictions

    home, config, prepared = registry
    old = log_as_service(fresh_log, config, prepared.splits.x_test.head(10))
    with fresh_log:
        fresh_log.executemany("UPDATE predictions SET logged_at = logged_at - 40 * 86400 WHERE request_id = ?",
                              [(request_id,) for request_id in old])
    recent = log_as_service(fresh_log, config, prepared.splits.x_test.head(5))
    kept = config.model_copy(update={"serving": config.serving.model_copy(update={
        "privacy": config.serving.privacy.model_copy(update={"retention_days": 30})})})
    monitor(kept)
    assert [entry["request_id"] for entry in read_predictions(fresh_log)] == recent
    purge = audit.entries(fresh_log, "log.purge")[-1]
    assert purge.actor == "monitoring flow" and purge.before.startswith("10 logged request(s)")


def test_maas_schedule_serves_cron_deployments_and_a_drift_retrain_completes(registry, fresh_log, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    from flows.monitor import monitor
    from maas.tracking import mlflow_client

    home, config, prepared = registry
    env = dict(os.environ, MAAS_HOME=str(home), PREFECT_API_URL=prefect_server)
    log_file = open(home / "schedule.log", "w")
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "maas", "schedule", "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"),
         *[arg for setting in QUICK for arg in ("--set", setting)], "--set", "schedule.monitor_cron=*/30 * * * *"],
        env=env, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=interruptible)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    train = client.read_deployment_by_name(f"maas-train/{config.model_name}-train")
                    watch = client.read_deployment_by_name(f"maas-monitor/{config.model_name}-monitor")
                    break
                except Exception:
                    assert time.monotonic() < deadline and scheduler.poll() is None, (home / "schedule.log").read_text()
                    time.sleep(1)
            assert [s.schedule.cron for s in train.schedules] == ["0 3 * * 1"]
            assert [s.schedule.cron for s in watch.schedules] == ["*/30 * * * *"]
            assert f"model:{config.model_name}" in train.tags and "config:quick.yaml" in train.tags
            assert train.global_concurrency_limit is not None and train.global_concurrency_limit.limit == 1

            rows = shifted(prepared)
            ids = log_as_service(fresh_log, config, rows)
            labels_path = home / "labels.csv"
            truth = np.asarray(prepared.labels, dtype=object)[prepared.splits.y_test]
            pd.DataFrame({"request_id": ids, "label": truth}).to_csv(labels_path, index=False)
            appending = config.model_copy(update={"monitoring": config.monitoring.model_copy(
                update={"labels_path": str(labels_path), "append_labelled": True, "rollback": False})})
            summary = monitor(appending).to_dict()  # triggers the training deployment the scheduler serves
            flow_run_id = summary["retrain"]["flow_run_id"]
            assert flow_run_id, summary["retrain"]
            deadline = time.monotonic() + 300
            while (state := client.read_flow_run(flow_run_id).state).type not in (
                    StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED):
                assert time.monotonic() < deadline and scheduler.poll() is None, (home / "schedule.log").read_text()
                time.sleep(2)
            assert state.type == StateType.COMPLETED, (home / "schedule.log").read_text()[-3000:]
    finally:
        scheduler.send_signal(signal.SIGINT)
        scheduler.wait(timeout=60)
        log_file.close()
    newest = max(mlflow_client().search_model_versions(f"name='{config.model_name}'"), key=lambda v: int(v.version))
    assert int(newest.version) >= 3 and newest.tags["gate"] in ("promoted", "held")  # the gate decided
    params = mlflow_client().get_run(newest.run_id).data.params
    assert int(params["data.n_rows"]) == 569 + len(rows)  # the labelled production rows were appended


def test_prefects_own_cli_lists_what_maas_schedule_serves(registry, tmp_path):
    """Against the server `maas schedule` starts for itself (no PREFECT_API_URL): Prefect 3.8.8 answered
    these list calls with 422 under pydantic 2.14."""
    home, config, _ = registry
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(MAAS_HOME=str(home), PREFECT_HOME=str(tmp_path / "prefect"), PYTHONUNBUFFERED="1",
               COLUMNS="250")  # Prefect's tables cut long names to the terminal's width
    log_path = tmp_path / "schedule.log"
    with open(log_path, "w") as log:
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "maas", "schedule", "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"),
             *[arg for setting in QUICK for arg in ("--set", setting)]],
            env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 300
        while "Prefect API " not in log_path.read_text():
            assert time.monotonic() < deadline and scheduler.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        api_url = log_path.read_text().split("Prefect API ", 1)[1].split(";", 1)[0]
        cli_env = dict(env, PREFECT_API_URL=api_url)
        listed = {}
        for command in ("deployment ls", "flow-run ls", "flow ls", "work-pool ls"):
            done = subprocess.run([sys.executable, "-m", "prefect", *command.split()], env=cli_env,
                                  capture_output=True, text=True, timeout=120)
            output = done.stdout + done.stderr
            assert done.returncode == 0 and "exception" not in output.lower(), (command, output[-2000:])
            listed[command] = output
        while f"{config.model_name}-monitor" not in listed["deployment ls"]:  # the runner registers both
            assert time.monotonic() < deadline, listed["deployment ls"]
            time.sleep(2)
            listed["deployment ls"] = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], env=cli_env,
                                                     capture_output=True, text=True, timeout=120).stdout
        assert f"{config.model_name}-train" in listed["deployment ls"]
    finally:
        scheduler.send_signal(signal.SIGINT)
        scheduler.wait(timeout=60)


def test_schedule_pool_registers_deployments_that_a_process_worker_runs(registry, fresh_log, prefect_server):
    from prefect.deployments import run_deployment

    home, config, _ = registry
    env = dict(os.environ, MAAS_HOME=str(home), PREFECT_API_URL=prefect_server)
    pool = f"maas-test-{uuid.uuid4().hex[:6]}"
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"],
                   env=env, check=True, capture_output=True)
    registered = subprocess.run(
        [sys.executable, "-m", "maas", "schedule", "--pool", pool, "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"),
         *[arg for setting in QUICK for arg in ("--set", setting)]],
        env=env, capture_output=True, text=True, timeout=180)
    assert registered.returncode == 0 and f"for work pool '{pool}'" in registered.stdout, registered.stderr
    with open(home / "worker.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
                                  env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
        try:
            flow_run = run_deployment(f"maas-monitor/{config.model_name}-monitor", timeout=240, as_subflow=False)
        finally:
            try:
                worker.wait(timeout=30)  # a --run-once worker exits after its run
            except subprocess.TimeoutExpired:
                worker.terminate()
                worker.wait(timeout=30)
    assert flow_run.state.is_completed(), (home / "worker.log").read_text()[-3000:]


def test_maas_monitor_prints_the_check_and_writes_the_summary(registry, fresh_log, tmp_path, capsys):
    from maas.cli import main

    home, config, prepared = registry
    rows = shifted(prepared)
    rows.loc[rows.index[:3], "mean radius"] = 1e308  # finite, as a client may send it: no inf in the check
    log_as_service(fresh_log, config, rows)
    summary_path = tmp_path / "check.json"
    exit_code = main(["monitor", "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"), "--summary", str(summary_path),
                      "--set", "monitoring.retrain=false", "--set", "serving.privacy.columns={mean smoothness: drop}"])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    assert f"Checked {config.model_name}/2@champion" in captured.out and "ALERT    drift" in captured.out
    assert "Traceback" not in captured.out + captured.err and "| ERROR" not in captured.err
    assert "RuntimeWarning" not in captured.err
    assert "  private  mean smoothness: not measured, the log keeps them hashed, masked or not at all" in captured.out
    summary = json.loads(summary_path.read_text(), parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))
    assert summary["drift"]["n_rows"] == len(prepared.splits.x_test)
