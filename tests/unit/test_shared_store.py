"""The service store on PostgreSQL (MAAS_STORE_URL), as replicas on several hosts share it: each
replica's meter journals are applied exactly once into one usage table, the monitor reads every
replica's logged predictions, and the rest of the store (keys, checks, incidents) answers as on
SQLite. Each test gets its own database, dropped afterwards."""

from __future__ import annotations

import socket
import threading

import pytest

from maas.errors import MaasInputError
from maas.service_store import (
    apply_journals, close_incident, connect, create_key, last_check, list_keys, log_predictions, open_incident,
    open_incidents,
    read_predictions, revoke_key, rows_used, save_check, usage_report,
)
from tasks.prediction_log import read_logged_rows
from tests.unit.test_metering import record

pytestmark = pytest.mark.team


@pytest.fixture
def shared_store(maas_home, postgres_database, monkeypatch) -> str:
    monkeypatch.setenv("MAAS_STORE_URL", postgres_database)
    return postgres_database


def dead_journal(home, name: str, body: bytes):
    """A meter journal of a worker that is gone, in one replica's home (its own MAAS_HOME)."""
    folder = home / "run" / "meter"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{socket.gethostname()}~{name}~1.00~000000.journal"
    path.write_bytes(body)
    return folder


def test_two_replicas_journals_are_summed_once_in_the_shared_store(shared_store, tmp_path):
    first_replica = dead_journal(tmp_path / "replica-1", "999991", record("a") * 300 + record("a", 5, logged=True))
    second_replica = dead_journal(tmp_path / "replica-2", "999992", record("a") * 200 + record("b", 3, status=429))
    applied = []
    connections = [connect(), connect(), connect(), connect()]
    # each replica's flush and a `maas usage` on another host, all at once: every journal once
    jobs = [(connections[0], first_replica), (connections[1], second_replica), (connections[2], first_replica),
            (connections[3], second_replica)]
    threads = [threading.Thread(target=lambda c=c, f=f: applied.append(apply_journals(c, f))) for c, f in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(applied) == [0, 0, 201, 301]
    usage = {row["key_id"]: row for row in usage_report(connect())}
    assert (usage["a"]["requests"], usage["a"]["rows"]) == (501, 2 * 500 + 5)
    assert (usage["b"]["requests"], usage["b"]["rows"], usage["b"]["errors"]) == (1, 0, 1)
    assert rows_used(connect(), "2027-01") == {"a": 1005, "b": 0}  # 1.8e9 s is January 2027
    (logged,) = read_predictions(connect())
    assert logged["key_id"] == "a" and logged["logged_at"] == 1_800_000_000.0


def test_keys_checks_and_incidents_work_on_postgresql(shared_store):
    store = connect()
    key, plain = create_key(store, "team", "pro")
    assert plain.startswith("maas_") and [k.key_id for k in list_keys(store)] == [key.key_id]
    assert revoke_key(store, key.key_id) and not revoke_key(store, key.key_id)
    save_check(store, "m", 1_800_000_000.125, {"requests": 3})
    assert last_check(store, "m") == (1_800_000_000.125, {"requests": 3})  # seconds kept to the millisecond
    open_incident(store, "m", "drift", "3 features")
    assert open_incidents(store, "m") == {"drift": "3 features"}
    close_incident(store, "m", "drift")
    assert open_incidents(store, "m") == {}
    log_predictions(store, [("r1", 1_800_000_000.5, key.key_id, "m/3@champion", 200, '{"rows": [{"x": 1.5}]}',
                             '[{"label": "yes"}]'), ("r2", 1_800_000_001.0, key.key_id, "other/1", 200, '{"rows": []}', "[]")])
    logged = read_logged_rows(store, "m", 1_800_000_000.0, 1_800_000_000.5)  # what the monitor reads: this model's
    assert logged.inputs.to_dict("records") == [{"x": 1.5}] and logged.meta["predicted"].tolist() == ["yes"]


def test_an_unreachable_store_is_one_line_without_its_password(maas_home, monkeypatch):
    monkeypatch.setenv("MAAS_STORE_URL", "postgresql://maas:hunter2@127.0.0.1:1/nowhere")
    with pytest.raises(MaasInputError, match=r"MAAS_STORE_URL: cannot reach .*127\.0\.0\.1:1") as raised:
        connect()
    assert "hunter2" not in str(raised.value)
