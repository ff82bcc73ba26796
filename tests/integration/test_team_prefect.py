"""The team's Prefect: a Prefect server on PostgreSQL, a process work pool with two workers, and the
deployments `maas schedule --pool` registers. Two training runs triggered at once for one model
each land on a worker and never overlap (the deployment's concurrency limit holds across workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import PROJECT_ROOT, free_port, wait_until_up

pytestmark = [pytest.mark.slow, pytest.mark.team]

QUICK = ["--set", "serving.build_bento=false", "--set", "compression.variants=[fp32]", "--set", "tuning.enabled=false",
         "--set", "model.families=[network]", "--dataset", "wine"]


@pytest.fixture
def prefect_on_postgres(postgres_database, tmp_path):
    """(API URL, environment) of a `prefect server start` whose database is PostgreSQL."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1",
               PREFECT_API_DATABASE_CONNECTION_URL=postgres_database.replace("+psycopg", "+asyncpg"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               # the waits Prefect puts between a worker's polls (10 s) and before a run the deployment's
               # concurrency limit held back asks again (30 s): the test spent most of its 60 s in them
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3")
    log = open(tmp_path / "prefect-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_up(f"{api}/health", 180, server)
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_two_workers_run_the_deployments_and_one_models_trainings_never_overlap(prefect_on_postgres, maas_home, tmp_path):
    import httpx

    api, env = prefect_on_postgres
    env = {**env, "MAAS_HOME": str(maas_home)}
    pool = f"maas-team-{uuid.uuid4().hex[:6]}"
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    registered = subprocess.run([sys.executable, "-m", "maas", "schedule", "--pool", pool,
                                 "--config", str(PROJECT_ROOT / "configs" / "quick.yaml"), *QUICK],
                                env=env, capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    logs = [open(tmp_path / f"worker-{index}.log", "w") for index in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                 "--name", f"worker-{index}"], env=env, cwd=maas_home.parent, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
               for index, log in enumerate(logs)]
    try:
        triggered = [subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "maas-train/maas-wine-train"],
                                    env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
        assert all(done.returncode == 0 for done in triggered), [done.stdout + done.stderr for done in triggered]

        deadline, runs = time.monotonic() + 480, []
        while time.monotonic() < deadline:
            found = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"name": {"any_": ["maas-wine-train"]}}},
                               timeout=30).json()
            runs = [run for run in found if not run["auto_scheduled"]]  # the cron's own future runs aside
            if len(runs) == 2 and all(run["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for run in runs):
                break
            time.sleep(3)
        worker_logs = "\n".join((tmp_path / f"worker-{index}.log").read_text()[-2000:] for index in range(2))
        assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"], worker_logs
        spans = sorted((run["start_time"], run["end_time"]) for run in runs)
        assert spans[0][1] <= spans[1][0], spans  # one model's trainings one after the other
        assert {run["work_pool_name"] for run in runs} == {pool}
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        for log in logs:
            log.close()
