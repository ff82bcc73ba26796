"""Two real `maas serve` replicas, each with its own MAAS_HOME (two hosts), behind one key: tier limits
in Redis (serving.limits_backend: redis) and usage and the prediction log in one PostgreSQL store
(MAAS_STORE_URL). A burst at both admits the key's bucket once between them, and the store holds
every request of both, which the monitor's reader sees."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.conftest import PROJECT_ROOT, free_port, quick_config
from tests.unit.test_redis_limits import REDIS_URL, prefix  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.team]

BUCKET = 50  # requests a minute: the bucket holds 50 tokens


def start_replica(home, config_path, port: int, env: dict, log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "maas", "serve", "--model", "maas-wine@champion", "--port", str(port),
                             "--config", str(config_path)], env={**env, "MAAS_HOME": str(home)}, cwd=PROJECT_ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen, port: int, log_path) -> None:
    for _ in range(360):
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"replica on {port} not ready: {log_path.read_text()[-3000:]}")


async def burst(ports: list[int], key: str, rows: list[dict], per_replica: int) -> list[int]:
    """per_replica one-row requests to each replica, 16 at a time each, within a few seconds."""
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(port: int) -> int:
            answer = await client.post(f"http://127.0.0.1:{port}/predict", json={"rows": rows[:1]},
                                       headers={"X-API-Key": key})
            return answer.status_code

        limit = asyncio.Semaphore(32)

        async def limited(port: int) -> int:
            async with limit:
                return await one(port)

        return await asyncio.gather(*(limited(port) for port in ports for _ in range(per_replica)))


def test_two_replicas_share_one_bucket_and_one_usage_store(prefect_server, maas_home, tmp_path, postgres_database,
                                                           prefix, monkeypatch):  # noqa: F811
    from flows.train_pipeline import train_pipeline
    from sklearn.datasets import load_wine

    from maas.api_keys import create_key
    from maas.service_store import connect, usage_report
    from maas.paths import tracking_uri
    from tasks.prediction_log import read_logged_rows

    train_pipeline(quick_config("wine", "serving.build_bento=false"))
    monkeypatch.setenv("MAAS_STORE_URL", postgres_database)
    key_record, key = create_key(connect(), "team", "team")  # once, in the shared store: both replicas know it
    config_path = tmp_path / "replicas.yaml"
    config_path.write_text(yaml.safe_dump({"serving": {
        "workers": 1, "limits_backend": "redis", "redis_url": REDIS_URL, "limits_prefix": prefix,
        "tiers": {"team": {"requests_per_minute": BUCKET, "monthly_rows": 10**6}}}}))
    # both read the registry the run wrote (a tracking server's URL in a real team)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "MAAS_STORE_URL": postgres_database}
    ports = [free_port(), free_port()]
    homes = [tmp_path / "host-1", tmp_path / "host-2"]
    logs = [tmp_path / "replica-1.log", tmp_path / "replica-2.log"]
    replicas = [start_replica(home, config_path, port, env, log) for home, port, log in zip(homes, ports, logs)]
    try:
        for replica, port, log in zip(replicas, ports, logs):
            wait_ready(replica, port, log)
        rows = json.loads(load_wine(as_frame=True).data.head(1).to_json(orient="records"))
        started = time.monotonic()
        statuses = asyncio.run(burst(ports, key, rows, per_replica=BUCKET))
        seconds = time.monotonic() - started
        admitted = statuses.count(200)
        assert set(statuses) <= {200, 429}, statuses
        # 100 requests in a few seconds: the bucket's 50, and the tokens refilled meanwhile (50 a minute)
        assert BUCKET <= admitted <= BUCKET + 1 + int(seconds * BUCKET / 60), (admitted, seconds)
        for _ in range(60):  # each replica's meter flushes its journal into the shared store every second
            usage = [row for row in usage_report(connect()) if row["key_id"] == key_record.key_id]
            if usage and usage[0]["requests"] == 2 * BUCKET:
                break
            time.sleep(0.5)
    finally:
        for replica in replicas:
            replica.terminate()
        for replica in replicas:
            replica.wait(timeout=60)
    assert not any(home.joinpath("service.db").exists() for home in homes)  # nothing went to a local store
    (usage,) = [row for row in usage_report(connect()) if row["key_id"] == key_record.key_id]
    assert (usage["requests"], usage["rows"], usage["errors"]) == (2 * BUCKET, admitted, 2 * BUCKET - admitted)
    logged = read_logged_rows(connect(), "maas-wine", 0, time.time() + 1)
    assert len(logged.inputs) == admitted  # every answered row of both replicas, where the monitor reads
