"""The prediction service for real: `maas serve` runs `bentoml serve` on a loopback port, with API
keys, tiers, metering and the prediction log, against a model registered by a real flow run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from maas import audit
from maas.api_keys import create_key, rotate_key
from maas.service_store import connect, read_predictions, usage_report
from tests.conftest import free_port, module_home, quick_config, wait_until_up

pytestmark = pytest.mark.slow

# Two worker processes: the tier limits, metering and /metrics must hold across them. One web page's
# origin may call the service from a browser.
WEB_PAGE = "https://app.example.com"
SERVICE_SETTINGS = ("serving.workers=2", "serving.tiers={free: {requests_per_minute: 3, monthly_rows: 100000}, "
         "pro: {requests_per_minute: 100000, monthly_rows: 100000000}, tiny: {requests_per_minute: 1000, monthly_rows: 5}, "
         "budget: {requests_per_minute: 100000, monthly_rows: 100000000, model: challenger}}",
                    f"serving.cors.allow_origins=[{WEB_PAGE}]")


@pytest.fixture(scope="module")
def service(prefect_server, tmp_path_factory):
    """(base url, maas home, keys, test rows, summary, cold start s) of a running service."""
    from flows.train_pipeline import train_pipeline

    with module_home(tmp_path_factory) as home:
        # The Bento built here carries this run's serving section; `maas serve` below gets its own --set
        # (the same tiers, but every request logged).
        summary = train_pipeline(quick_config("breast_cancer", "compression.variants=[fp32, int8]",
                                              *SERVICE_SETTINGS, "serving.prediction_log_sample=0")).to_dict()
        # A deliberately weak second version: the gate keeps it @challenger, and the budget tier is served from it.
        weak = train_pipeline(quick_config("breast_cancer", "compression.variants=[fp32]", "tuning.enabled=false",
                                           "train.max_epochs=1", "model.hidden_sizes=[1]", "model.family=mlp", "serving.build_bento=false")).to_dict()
        assert weak["alias"] == "challenger", weak["gate"]
        connection = connect(home / "service.db")
        keys = {tier: create_key(connection, f"{tier}-user", tier)[1] for tier in ("pro", "free", "tiny", "budget")}
        port = free_port()
        env = dict(os.environ, MAAS_HOME=str(home))
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(home / "serve.log", "w")
        started = time.monotonic()
        server = subprocess.Popen(
            [sys.executable, "-m", "maas", "serve", "--model", "maas-breast_cancer@champion", "--port", str(port),
             *(argument for setting in SERVICE_SETTINGS for argument in ("--set", setting))], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(f"{base}/readyz", 120, server)
            cold_start = time.monotonic() - started
            from sklearn.datasets import load_breast_cancer

            rows = json.loads(load_breast_cancer(as_frame=True).data.head(20).to_json(orient="records"))
            yield base, home, keys, rows, summary, cold_start
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()


def predict(base, rows, key=None, headers=None):
    headers = {**({"X-API-Key": key} if key else {}), **(headers or {})}
    return httpx.post(f"{base}/predict", json={"rows": rows}, headers=headers, timeout=30)


def test_served_predictions_equal_the_registered_model(service, monkeypatch):
    import mlflow
    import pandas as pd

    base, home, keys, rows, summary, cold_start = service
    response = predict(base, rows, keys["pro"])
    assert response.status_code == 200 and response.headers["x-request-id"]
    served = response.json()
    assert len(served) == len(rows)
    monkeypatch.setenv("MAAS_HOME", str(home))
    from maas.tracking import mlflow_client

    mlflow_client()
    registered = mlflow.pyfunc.load_model(f"models:/{summary['model_name']}@champion")
    expected = registered.predict(pd.DataFrame(rows))
    assert [item["label"] for item in served] == list(expected["label"])
    for item, (_, row) in zip(served, expected.iterrows()):
        for label, probability in item["probabilities"].items():
            assert probability == pytest.approx(row[f"proba_{label}"], abs=1e-6)
    print(f"cold start to /readyz: {cold_start:.1f} s")
    # a client of `mlflow models serve`: MLflow's request and answer at /invocations, its /ping
    invoked = httpx.post(f"{base}/invocations", json={"dataframe_split": {"columns": list(rows[0]), "data": [
        list(row.values()) for row in rows]}}, headers={"X-API-Key": keys["pro"]}, timeout=30)
    assert invoked.status_code == 200, invoked.text
    assert [item["label"] for item in invoked.json()["predictions"]] == list(expected["label"])
    assert httpx.get(f"{base}/ping", timeout=30).status_code == 200
    # a word in a numeric column: the pyfunc refuses it as /predict does, as an MlflowException that
    # `mlflow models serve` answers with a 400 carrying this message
    from mlflow.exceptions import MlflowException

    worded = pd.DataFrame(rows).astype(object)
    worded.loc[2, "mean radius"] = "forty"
    with pytest.raises(MlflowException, match=r"^row 2, column 'mean radius': not a number: 'forty'$") as refused:
        registered.predict(worded)
    assert refused.value.get_http_status_code() == 400 and isinstance(refused.value, ValueError)
    assert predict(base, json.loads(worded.to_json(orient="records")), keys["pro"]).status_code == 400


def listening_sockets(port: int) -> set[str]:
    """The inodes of the sockets listening on a loopback TCP port, from /proc/net/tcp."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def workers_started(port: int, workers: int = 2) -> set[str]:
    """The sockets listening on the port once every worker has started its server (the arbiter's
    and one per worker, deployments/connections.py): /readyz answers as soon as the first one has."""
    deadline = time.monotonic() + 60
    while len(listening := listening_sockets(port)) < workers + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    return listening


def test_workers_parse_http_with_httptools_on_uvloop(service):
    """uvicorn takes its C parser and event loop only when they import (h11 and asyncio otherwise, at
    ~1.6x the CPU per one-row request): the workers holding the port must have both loaded."""
    import psutil

    port = int(service[0].rsplit(":", 1)[1])
    workers_started(port)
    holders = {connection.pid for connection in psutil.net_connections("tcp")
               if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN}
    workers = [psutil.Process(pid) for pid in holders
               if any("_bentoml_impl.worker" in part for part in psutil.Process(pid).cmdline())]
    assert workers, f"no BentoML worker holds port {port}: {holders}"
    for worker in workers:
        loaded = " ".join(region.path for region in worker.memory_maps())
        assert "httptools" in loaded and "uvloop" in loaded, worker.cmdline()


def test_keep_alive_connections_are_spread_over_the_workers(service):
    """Every worker waiting on the one shared socket, the kernel handed nearly every connection to
    the same worker (32 clients: 28 / 4), and its clients waited several times longer than the
    other's. Each worker has a socket of its own in the port's group, connections are dealt to them,
    and a worker holding two more than the other closes one after its answer: 64 keep-alive clients
    end up 32 / 32 or 31 / 33, every request answered (dealt at random alone, 1 time in 10)."""
    import http.client

    import psutil

    base, _, keys, rows, _, _ = service
    port = int(base.rsplit(":", 1)[1])
    listening = workers_started(port)
    workers = [process for process in psutil.Process().children(recursive=True)
               if any("_bentoml_impl.worker" in part for part in process.cmdline())]
    assert len(workers) == 2, [worker.cmdline() for worker in workers]

    def held(worker) -> set[str]:
        links = [os.readlink(f"/proc/{worker.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{worker.pid}/fd")]
        return {link[8:-1] for link in links if link.startswith("socket:[")} & listening
    owned = [held(worker) for worker in workers]
    shared = set.intersection(*owned)
    assert len(listening) == 3 and len(shared) == 1, (listening, owned)  # the arbiter's, and one each
    assert all(len(sockets - shared) == 1 for sockets in owned), owned

    clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(64)]
    body, headers = json.dumps({"rows": rows[:1]}), {"X-API-Key": keys["pro"], "content-type": "application/json"}
    closed = 0
    try:
        for _ in range(10):  # a closed connection reopens on its client's next request
            for client in clients:
                client.request("POST", "/predict", body, headers)
                response = client.getresponse()
                assert response.status == 200 and len(json.loads(response.read())) == 1
                closed += response.getheader("connection") == "close"
        per_worker = [sum(1 for held_connection in worker.net_connections("tcp")
                          if held_connection.laddr.port == port and held_connection.status == psutil.CONN_ESTABLISHED)
                      for worker in workers]
    finally:
        for client in clients:
            client.close()
    assert sum(per_worker) == 64 and max(per_worker) - min(per_worker) <= 1, (per_worker, closed)
    print(f"64 keep-alive clients over 2 workers: {per_worker}, {closed} connections closed on the way")


@pytest.mark.parametrize("change, field", [
    (lambda row: row.pop("mean radius"), "mean radius"),
    (lambda row: row.update({"mean texture": "soft"}), "mean texture"),
])
def test_bad_rows_get_400_naming_the_row_and_column(service, change, field):
    base, _, keys, rows, _, _ = service
    bad = [dict(row) for row in rows[:3]]
    change(bad[2])
    response = predict(base, bad, keys["pro"])
    assert response.status_code == 400
    (error,) = response.json()["detail"]
    assert error["loc"] == ["rows", 2, field]


def test_columns_the_model_does_not_use_are_ignored_and_named_in_a_header(service):
    base, _, keys, rows, _, _ = service
    response = predict(base, [{**row, "customer_id": "C1", "not a column": 1.0} for row in rows[:2]], keys["pro"])
    assert response.status_code == 200
    assert response.json() == predict(base, rows[:2], keys["pro"]).json()
    assert response.headers["x-maas-ignored-columns"] == "customer_id, not%20a%20column"


def test_numbers_sent_as_text_are_read_as_pydantic_would_and_logged_as_validated(service):
    base, home, keys, rows, _, _ = service
    as_text = [{**row, "mean radius": str(row["mean radius"])} for row in rows[:2]]
    response = predict(base, as_text, keys["pro"], {"X-Request-Id": "as-text"})
    assert response.status_code == 200
    assert response.json() == predict(base, rows[:2], keys["pro"]).json()
    time.sleep(2)
    (logged,) = [entry for entry in read_predictions(connect(home / "service.db")) if entry["request_id"] == "as-text"]
    assert logged["inputs"] == rows[:2]


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_rows(service):
    """Adaptive batching: requests that arrive while the model runs go in one call, and the answer
    is split back correctly. maas_batch_rows on /metrics counts the calls."""
    import asyncio

    base, _, keys, rows, _, _ = service

    def model_calls() -> float:
        metrics = httpx.get(f"{base}/metrics").text
        return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("maas_batch_rows_count")))

    alone = {index: predict(base, [rows[index]], keys["pro"]).json() for index in range(len(rows))}
    before = model_calls()

    async def burst():
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": keys["pro"]}, timeout=30) as client:
            requests = [client.post("/predict", json={"rows": [rows[index % len(rows)]] * (1 + index % 3)})
                        for index in range(64)]
            return await asyncio.gather(*requests)

    answers = asyncio.run(burst())
    assert all(response.status_code == 200 for response in answers)
    for index, response in enumerate(answers):
        assert response.json() == alone[index % len(rows)] * (1 + index % 3)
    assert model_calls() - before < 64  # some requests shared a model call


def test_inf_empty_and_malformed_bodies_are_4xx_and_nan_is_missing(service):
    base, _, keys, rows, _, _ = service
    headers = {"X-API-Key": keys["pro"], "content-type": "application/json"}
    nan = json.dumps({"rows": rows[:1]}).replace(str(rows[0]["mean radius"]), "NaN", 1)
    for body in (nan.replace("NaN", "Infinity"), '{"rows": []}', "{not json", "[1, 2]", '{"rows": [1]}', ""):
        response = httpx.post(f"{base}/predict", content=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500, (body[:40], response.status_code, response.text)
    # a bare NaN is pandas' gap as Python's json writes it: missing, as null is
    as_nan, as_null = (httpx.post(f"{base}/predict", content=body, headers=headers, timeout=30)
                       for body in (nan, nan.replace("NaN", "null")))
    assert as_nan.status_code == as_null.status_code == 200 and as_nan.json() == as_null.json()
    latin1_id = httpx.post(f"{base}/predict", json={"rows": rows[:1]}, timeout=30,
                           headers={"X-API-Key": keys["pro"], "X-Request-Id": b"caf\xe9"})  # not UTF-8
    assert latin1_id.status_code == 200 and latin1_id.headers["x-request-id"] == "caf\xe9"


def test_oversized_requests_get_413(service):
    base, _, keys, rows, _, _ = service
    assert predict(base, rows * 60, keys["pro"]).status_code == 413  # 1200 rows > 1000
    padding = {"rows": rows, "pad": "x" * 1_100_000}
    response = httpx.post(f"{base}/predict", json=padding, headers={"X-API-Key": keys["pro"]}, timeout=30)
    assert response.status_code == 413 and "exceeds" in response.json()["error"]
    assert "send fewer rows per request" in response.json()["error"]  # what the client can do about it
    # urllib and requests send the whole body before they read: the service reads the refused body
    # too, so they get the 413 rather than a connection closed under them (a broken pipe)
    import urllib.error
    import urllib.request

    big = json.dumps({**padding, "pad": "x" * 4_000_000}).encode()
    for key, status in [(keys["pro"], 413), ("maas_" + "0" * 38, 401)] * 3:  # refused before reading: 401 too
        request = urllib.request.Request(f"{base}/predict", big, {"X-API-Key": key, "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == status
    chunks = (b"x" * 65536 for _ in range(64))  # no Content-Length: chunked, refused as it passes the limit
    chunked = httpx.post(f"{base}/predict", content=chunks, headers={"X-API-Key": keys["pro"]}, timeout=30)
    assert chunked.status_code == 413 and "exceeds" in chunked.json()["error"]


def test_missing_invalid_rotated_and_revoked_keys_get_401(service):
    base, home, _, rows, _, _ = service
    assert predict(base, rows[:1]).status_code == 401
    assert "malformed" in predict(base, rows[:1], "maas_not-a-real-key").json()["error"]
    connection = connect(home / "service.db")
    key_record, old_secret = create_key(connection, "short-lived", "pro")
    answered = predict(base, rows[:1], old_secret)  # at once: an unknown well-formed key is looked up
    assert answered.status_code == 200 and answered.headers["x-ratelimit-limit"] == "100000"
    assert int(answered.headers["x-ratelimit-remaining"]) == 99_999
    registrations = [(entry.action, entry.after, entry.actor.split(" ")[:2]) for entry in audit.entries(connection, "alias")]
    assert registrations == [("alias.promote", "v1", ["training", "run"]), ("alias.register", "v2", ["training", "run"])]
    key = rotate_key(connection, key_record.key_id, grace_s=0)
    assert predict(base, rows[:1], key).status_code == 200
    time.sleep(1.5)  # the service reloads keys every second: the old secret's grace of 0 s is over
    assert "rotated out" in predict(base, rows[:1], old_secret).json()["error"]
    env = dict(os.environ, MAAS_HOME=str(home))
    done = subprocess.run([sys.executable, "-m", "maas", "keys", "revoke", key_record.key_id], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    time.sleep(1.5)
    assert predict(base, rows[:1], key).status_code == 401


def test_tier_rate_limit_and_monthly_quota_answer_429_with_retry_after(service):
    base, _, keys, rows, _, _ = service
    statuses = [predict(base, rows[:1], keys["free"]) for _ in range(5)]  # 3 per minute
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert predict(base, rows[:4], keys["tiny"]).status_code == 200  # 4 of 5 monthly rows
    over = predict(base, rows[:2], keys["tiny"])
    assert over.status_code == 429 and "quota" in over.json()["error"] and int(over.headers["retry-after"]) > 0


def test_usage_is_metered_per_key_and_shown_by_maas_usage(service):
    base, home, keys, rows, _, _ = service
    for _ in range(2):
        assert predict(base, rows[:7], keys["pro"]).status_code == 200
    assert predict(base, [{"wrong": 1}], keys["pro"]).status_code == 400
    time.sleep(2)  # the meter flushes every second
    env = dict(os.environ, MAAS_HOME=str(home))
    done = subprocess.run([sys.executable, "-m", "maas", "usage", "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    by_name = {row["name"]: row for row in json.loads(done.stdout)}
    pro = by_name["pro-user"]
    assert pro["requests"] >= 3 and pro["rows"] >= 14 and pro["errors"] >= 1 and pro["tier"] == "pro"
    assert "free-user" in by_name and by_name["free-user"]["errors"] >= 1  # the 429s count as errors


def test_prediction_log_holds_inputs_outputs_model_and_key(service):
    base, home, keys, rows, summary, _ = service
    response = predict(base, rows[:2], keys["pro"], headers={"X-Request-Id": "req-log-test"})
    assert response.status_code == 200
    time.sleep(2)
    logged = [entry for entry in read_predictions(connect(home / "service.db")) if entry["request_id"] == "req-log-test"]
    assert len(logged) == 1
    entry = logged[0]
    assert entry["inputs"] == rows[:2] and entry["outputs"] == response.json()
    assert entry["model"] == f"{summary['model_name']}/{summary['model_version']}@champion"
    assert entry["key_id"] != "anonymous" and entry["status"] == 200


def test_metadata_health_docs_and_metrics(service):
    base, _, _, _, summary, _ = service
    metadata = httpx.get(f"{base}/metadata").json()
    assert metadata["model"].startswith(f"{summary['model_name']}/{summary['model_version']}")
    assert metadata["test_metrics"]["f1_macro"] == pytest.approx(summary["test_metrics"]["f1_macro"])
    assert {"mean radius", "worst symmetry"} <= {column["name"] for column in metadata["input_schema"]}
    assert httpx.get(f"{base}/livez").status_code == 200
    assert "/predict" in httpx.get(f"{base}/docs.json").json()["paths"]
    time.sleep(1.2)
    metrics = httpx.get(f"{base}/metrics").text
    # /predict is answered ahead of BentoML's middleware (deployments/predict_first.py), under its metric names
    assert [line for line in metrics.splitlines() if line.startswith("bentoml_service_request_total{")
            and 'endpoint="/predict"' in line and 'http_response_code="200"' in line], metrics
    assert 'bentoml_service_request_total{endpoint="/docs.json"' in metrics  # BentoML's own, as before
    memory = [line for line in metrics.splitlines() if line.startswith("maas_process_resident_memory_bytes")]
    assert memory and float(memory[0].split()[-1]) > 10_000_000
    assert np.isfinite(float([line for line in metrics.splitlines() if line.startswith("maas_process_cpu_percent")][0].split()[-1]))


def test_the_monitor_reads_the_live_services_log_labels_and_metrics(service, monkeypatch, tmp_path):
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    from flows.monitor import monitor

    base, home, keys, _, summary, _ = service
    monkeypatch.setenv("MAAS_HOME", str(home))
    data = load_breast_cancer(as_frame=True)
    records = json.loads(data.data.to_json(orient="records"))
    truth = []
    for start in range(0, len(records), 50):
        request_id = f"monitor-{start}"
        assert predict(base, records[start:start + 50], keys["pro"], {"X-Request-Id": request_id}).status_code == 200
        truth += [(request_id, row, data.target_names[label])
                  for row, label in enumerate(data.target.iloc[start:start + 50])]
    labels_path = tmp_path / "labels.csv"
    pd.DataFrame(truth, columns=["request_id", "row", "label"]).to_csv(labels_path, index=False)
    time.sleep(2.5)  # the meter flushes the log and refreshes the gauges every second
    # The first scrape's p99 covers every request since the service started, the module's other
    # tests' too, and in one CI run on a 2-core VM one of those took over the 1 s default (2.5 s bucket):
    # this test reads the metrics; the latency alert itself is tested on fixed counters (test_monitoring).
    config = quick_config("breast_cancer", f"monitoring.metrics_url={base}/metrics",
                          f"monitoring.labels_path={labels_path}", "monitoring.retrain=false",
                          "monitoring.max_p99_ms=60000")
    check = monitor(config).to_dict()
    assert check["drift"]["n_rows"] >= len(records)
    quality = check["quality"]
    assert quality["n_labelled"] == len(records) and quality["metrics"]["f1_macro"] > 0.9 and not quality["alert"]
    health = check["health"]
    assert health["requests"] >= len(records) // 50 and health["error_rate"] == 0 and health["p99_ms"] > 0
    assert health["memory_bytes"] > 10_000_000 and health["cpu_percent"] is not None
    assert not {"error_rate", "latency", "quality", "service_down"} & {alert["kind"] for alert in check["alerts"]}


def test_a_tier_is_served_from_its_own_model_alias(service, monkeypatch):
    import mlflow
    import pandas as pd

    from maas.tracking import mlflow_client

    base, home, keys, rows, summary, _ = service
    monkeypatch.setenv("MAAS_HOME", str(home))
    mlflow_client()
    expected = {alias: mlflow.pyfunc.load_model(f"models:/{summary['model_name']}@{alias}").predict(pd.DataFrame(rows))
                for alias in ("champion", "challenger")}
    for tier, alias in (("budget", "challenger"), ("pro", "champion")):
        response = predict(base, rows, keys[tier], {"X-Request-Id": f"tier-{tier}"})
        assert response.status_code == 200
        served = [item["probabilities"][label] for item in response.json() for label in sorted(item["probabilities"])]
        wanted = expected[alias][sorted(c for c in expected[alias].columns if c.startswith("proba_"))].to_numpy().ravel()
        assert np.allclose(served, wanted, atol=1e-5), tier
    tiers = httpx.get(f"{base}/metadata").json()["tiers"]
    assert tiers["budget"]["served_by"].endswith("@challenger") and tiers["pro"]["served_by"].endswith("@champion")
    time.sleep(2)
    logged = {entry["request_id"]: entry["model"] for entry in read_predictions(connect(home / "service.db"))}
    assert logged["tier-budget"].endswith("@challenger") and logged["tier-pro"].endswith("@champion")


def test_serve_names_a_missing_model_in_one_line(service):
    _, home, _, _, _, _ = service
    env = dict(os.environ, MAAS_HOME=str(home))
    done = subprocess.run([sys.executable, "-m", "maas", "serve", "--model", "maas-breast_cancer@nope"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "maas: error: --model 'maas-breast_cancer@nope': registered model 'maas-breast_cancer' has no alias @nope"
    done = subprocess.run([sys.executable, "-m", "maas", "serve", "--model", "maas-breast-cancer@champion"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # a name spelt wrong: the store's models are named
    assert done.stderr.strip() == ("maas: error: --model 'maas-breast-cancer@champion': no registered model "
                                   "'maas-breast-cancer' (registered: maas-breast_cancer)")


@contextlib.contextmanager
def bento_served(bento: str, home):
    """`bentoml serve <bento tag>` on a free loopback port (no maas serve, no MLflow); yields its url."""
    port = free_port()
    env = dict(os.environ, MAAS_HOME=str(home))
    server = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento, "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=home)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", 120, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def pro_requests(home) -> int:
    return sum(entry["requests"] for entry in usage_report(connect(home / "service.db")) if entry["tier"] == "pro")


def test_a_page_of_the_allowed_origin_calls_predict_from_a_browser_and_another_origins_cannot(service):
    """serving.cors through `maas serve`: the preflight a browser sends before a POST with a key is
    answered; the answer to the page carries its origin; a page elsewhere gets neither."""
    base, home, keys, rows, summary, _ = service
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, x-api-key"}
    allowed = httpx.options(f"{base}/predict", headers={"Origin": WEB_PAGE, **preflight}, timeout=30)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == WEB_PAGE
    assert "x-api-key" in allowed.headers["access-control-allow-headers"]
    answered = predict(base, rows[:2], keys["pro"], {"Origin": WEB_PAGE})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == WEB_PAGE
    assert "x-request-id" in answered.headers["access-control-expose-headers"]
    elsewhere = {"Origin": "https://elsewhere.example"}
    assert httpx.options(f"{base}/predict", headers={**elsewhere, **preflight}, timeout=30).status_code == 400
    assert "access-control-allow-origin" not in predict(base, rows[:2], keys["pro"], elsewhere).headers


def test_the_bento_built_by_training_serves_its_runs_serving_config(service):
    """The Bento holds service, model and the training run's serving section: its tiers, auth and
    log sampling (0 here), and the champion for the budget tier, whose @challenger came later."""
    base, home, keys, rows, summary, _ = service
    assert summary["bento"]
    with bento_served(summary["bento"], home) as url:
        metered_before = pro_requests(home)
        from_bento = predict(url, rows, keys["pro"], {"X-Request-Id": "from-the-bento"})
        assert from_bento.status_code == 200
        assert from_bento.json() == predict(base, rows, keys["pro"]).json()
        assert predict(url, rows).status_code == 401  # auth is on by default
        over_quota = predict(url, rows[:6], keys["tiny"])  # the run's tiny tier: 5 rows a month
        assert over_quota.status_code == 429 and "Retry-After" in over_quota.headers
        tiers = httpx.get(f"{url}/metadata").json()["tiers"]
        assert set(tiers) == {"free", "pro", "tiny", "budget"} and tiers["free"]["requests_per_minute"] == 3
        assert predict(url, rows[:1], keys["pro"], {"Origin": WEB_PAGE}).headers["access-control-allow-origin"] == WEB_PAGE
        assert tiers["budget"]["served_by"] == tiers["pro"]["served_by"] == f"{summary['model_name']}/{summary['model_version']}@champion"
        time.sleep(2)
    assert pro_requests(home) == metered_before + 3  # two requests to the Bento, one to `maas serve`
    assert "from-the-bento" not in {entry["request_id"] for entry in read_predictions(connect(home / "service.db"))}


def test_a_bento_serves_a_tier_from_its_alias_when_the_alias_exists(service, monkeypatch):
    import bentoml

    from maas.config import load_config
    from maas.tracking import mlflow_client
    from maas.registered import ModelRef
    from tasks.package import build_bento, package_for_bento

    base, home, keys, rows, summary, _ = service
    monkeypatch.setenv("MAAS_HOME", str(home))
    build_bentofile, held = bentoml.bentos.build_bentofile, []
    monkeypatch.setattr(bentoml.bentos, "build_bentofile", lambda *args, **kwargs: held.append(
        store_lock_is_held()) or build_bentofile(*args, **kwargs))  # the real build, watched
    serving = load_config(overrides=list(SERVICE_SETTINGS)).serving
    packaged, tier_models, unserved = package_for_bento(mlflow_client(), ModelRef(summary["model_name"], "champion"), serving)
    assert set(tier_models) == {"budget"} and tier_models["budget"].ref.alias == "challenger" and not unserved
    with bento_served(build_bento(packaged, serving, tier_models), home) as url:
        assert held == [True]  # two runs building their Bentos at once share the name `maas`: one at a time
        assert httpx.get(f"{url}/metadata").json()["tiers"]["budget"]["served_by"].endswith("@challenger")
        for tier in ("budget", "pro"):
            assert predict(url, rows, keys[tier]).json() == predict(base, rows, keys[tier]).json(), tier


def store_lock_is_held() -> bool:
    """Whether some holder has the BentoML store's lock (tasks/package.py) now: flock refuses a second
    open file, even in this process."""
    import fcntl

    with open(Path(os.environ["BENTOML_HOME"]) / ".maas-store.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.fixture(scope="module")
def service_schema(service):
    import schemathesis

    base = service[0]
    return schemathesis.openapi.from_url(f"{base}/docs.json").include(path="/predict")


# schemathesis's own OpenAPI case strategy draws from `random` inside a strategy; Hypothesis says so in
# some runs and not others (the library's code, not this test's)
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(service_schema, service):
    """Schemathesis generates valid and invalid bodies from the service's own OpenAPI document. Its
    default strategy makes valid ones only, so a 4xx came by chance and one run in many drew 150 that
    all answered 200: both modes are drawn, and Hypothesis draws the same cases in every run."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    keys = service[2]
    statuses = []
    operations = [result.ok() for result in service_schema.get_all_operations()]
    assert [operation.path for operation in operations] == ["/predict"]
    for operation in operations:
        @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in GenerationMode)))
        @settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(headers={"X-API-Key": keys["pro"]}, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.body, response.status_code, response.text[:300])

        check()
    assert len(statuses) >= 50 and any(400 <= status < 500 for status in statuses)
