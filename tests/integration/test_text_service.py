"""A table with a text column through the whole chain for real: the flow finds the text, the
registered pyfunc and `maas serve` (its Bento model holding the encoder) answer raw rows of the
training file alike, and bad text gets a 400 naming the row and column."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest

from maas.api_keys import create_key
from maas.service_store import connect
from tests.conftest import PROJECT_ROOT, free_port, module_home, quick_config, wait_until_up
from tests.tables import write_messy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_service(prefect_server, tmp_path_factory):
    """(base url, key, the training file's rows, summary, what `maas run` prints) of a service for a
    model trained on tickets."""
    from flows.train_pipeline import train_pipeline

    with module_home(tmp_path_factory) as home:
        path, target = write_messy("tickets", home)
        trained = train_pipeline(quick_config(str(path), f"data.target={target}", "model.families=[network, linear]"))
        summary = trained.to_dict()
        key = create_key(connect(home / "service.db"), "reader", "pro")[1]
        port = free_port()
        env = dict(os.environ, MAAS_HOME=str(home))
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(home / "serve.log", "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "maas", "serve", "--model", "maas-tickets@champion",
                                       "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_until_up(f"{base}/readyz", 120, server)
                yield base, key, pd.read_csv(path), summary, trained.render()
            finally:
                server.terminate()
                server.wait(timeout=60)


def test_served_text_answers_equal_the_registered_model_on_raw_rows(text_service):
    import mlflow

    base, key, table, summary, _ = text_service
    rows = table.drop(columns=["urgency"]).head(30)
    assert rows["message"].isna().any() or table["message"].isna().any()
    expected = mlflow.pyfunc.load_model(f"models:/{summary['model_name']}@champion").predict(rows)
    body = json.loads(rows.to_json(orient="records"))  # NaN -> null, as a client sends a missing value
    answer = httpx.post(f"{base}/predict", json={"rows": body}, headers={"X-API-Key": key}, timeout=30)
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert [row["label"] for row in served] == expected["label"].tolist()
    np.testing.assert_allclose([[row["probabilities"][label] for label in sorted(row["probabilities"])] for row in served],
                               expected[[f"proba_{label}" for label in sorted(served[0]["probabilities"])]].to_numpy(),
                               atol=1e-5)
    assert summary["test_metrics"]["f1_macro"] > 0.8  # the wording carries the label


def test_the_run_counts_the_encoder_in_what_serving_loads(text_service):
    """The head is kilobytes; the int8 MiniLM beside it, which every request runs, is ~22 MiB."""
    _, _, _, summary, printed = text_service
    encoder_bytes = {variant["encoder_bytes"] for variant in summary["variants"]}
    assert len(encoder_bytes) == 1 and 15 * 2**20 < encoder_bytes.pop() < 40 * 2**20
    model_line = next(line for line in printed.splitlines() if line.startswith("  model  "))
    assert " MiB text encoder, " in model_line, model_line


def test_bad_text_gets_4xx_naming_the_row_and_column(text_service):
    base, key, table, _, _ = text_service
    good = {"message": "the site is down", "order_value": 10.0, "channel": "chat"}
    for bad in (42, ["a", "list"], {"an": "object"}):
        answer = httpx.post(f"{base}/predict", json={"rows": [good, {**good, "message": bad}]},
                            headers={"X-API-Key": key}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"].startswith("row 1, column 'message'"), answer.text
    empty = httpx.post(f"{base}/predict", content=b"", headers={"X-API-Key": key, "content-type": "application/json"})
    assert empty.status_code == 400
    long_text = httpx.post(f"{base}/predict", json={"rows": [{**good, "message": "word " * 2000}]},
                           headers={"X-API-Key": key}, timeout=30)
    assert long_text.status_code == 200  # truncated at the encoder's max length, as /metadata says
    metadata = httpx.get(f"{base}/metadata", timeout=10).json()
    assert metadata["text_columns"]["message"]["max_length_tokens"] == 128
    assert {"name": "message", "type": "text"} in metadata["input_schema"]


def test_the_monitor_checks_a_text_model_on_what_the_service_logged(text_service, tmp_path, capsys):
    """The served requests' text reaches the drift check (tokens, unknown share, embedding) and its
    figures are logged to MLflow: a text column's figure names held brackets MLflow refused."""
    from maas.cli import main
    from maas.tracking import mlflow_client

    base, key, table, summary, _ = text_service
    rows = json.loads(table.drop(columns=["urgency"]).to_json(orient="records"))
    for start in range(0, len(rows), 40):
        answer = httpx.post(f"{base}/predict", json={"rows": rows[start:start + 40]}, headers={"X-API-Key": key}, timeout=30)
        assert answer.status_code == 200, answer.text
    path = tmp_path / "check.json"
    exit_code = main(["monitor", "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"), "--summary", str(path),
                      "--set", f"monitoring.model={summary['model_name']}@champion", "--set", "monitoring.retrain=false"])
    captured = capsys.readouterr()
    assert exit_code == 0 and "Traceback" not in captured.out + captured.err, captured.err[-2000:]
    check = json.loads(path.read_text())
    run = mlflow_client().get_run(check["mlflow_run_id"])
    assert {"drift/psi/message _tokens_", "drift/psi/message _unknown share_"} <= set(run.data.metrics), run.data.metrics
