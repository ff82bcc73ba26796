"""The service store on PostgreSQL (MAAS_STORE_URL), as replicas on several hosts share it: each
replica's meter journals are applied exactly once into one usage table, the monitor reads every
replica's logged predictions, and the rest of the store (keys, checks, incidents) answers as on
SQLite. Each test gets its own database, dropped afterwards."""

from __future__ import annotations

import socket
import threading

import pytest

from maas import audit
from maas.api_keys import create_key, hash_key, key_grant, key_grants, list_keys, revoke_key, rotate_key
from maas.errors import MaasInputError
from maas.privacy import purge_predictions
from maas.service_store import (
    apply_journals, close_incident, connect, last_check, log_predictions, open_incident, open_incidents,
    read_predictions, rows_used, save_check, usage_report,
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


def test_keys_rotation_audit_and_billed_retries_on_postgresql(shared_store, tmp_path):
    store = connect()
    key, first = create_key(store, "team", "pro", ("predict", "read:usage"))
    second = rotate_key(store, key.key_id, grace_s=60)
    grants = key_grants(store)
    assert grants[hash_key(first)].ending == "rotated out" and grants[hash_key(second)].ends_at is None
    assert key_grant(store, hash_key(second)).scopes == {"predict", "read:usage"}
    writers = [connect() for _ in range(3)]  # three replicas writing the trail at once: one chain
    threads = [threading.Thread(target=lambda c=c: [audit.append(c, "test.write", "x", n, n + 1) for n in range(20)])
               for c in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    verdict = audit.verify(store)
    assert verdict.intact and verdict.entries == 62, verdict.problems  # + key.create, key.rotate
    retried = record("a", 4, request_id="order-1") * 2 + record("a", 1)  # a retry with the caller's id: billed once
    assert apply_journals(store, dead_journal(tmp_path, "999993", retried)) == 3
    assert usage_report(store)[0]["rows"] == 5
    log_predictions(store, [("r1", 1_000.0, "a", "m/1", 200, '{"rows": []}', "[]")])
    assert purge_predictions(store, 1) == 1 and read_predictions(store) == [] and usage_report(store)[0]["rows"] == 5


def test_keys_from_before_scopes_move_over_on_postgresql(shared_store):
    import psycopg

    with psycopg.connect(shared_store.replace("+psycopg", ""), autocommit=True) as old:
        old.execute("CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, name TEXT NOT NULL, "
                    "tier TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT)")
        old.execute("INSERT INTO api_keys VALUES ('0a0b0c0d', 'h', 'early', 'pro', '2026-10-01T08:00:00+00:00', NULL)")
    store = connect()
    assert [(key.key_id, key.scopes, key.state) for key in list_keys(store)] == [("0a0b0c0d", ("predict",), "active")]
    assert key_grant(connect(), "h").key_id == "0a0b0c0d"


def test_an_unreachable_store_is_one_line_without_its_password(maas_home, monkeypatch):
    monkeypatch.setenv("MAAS_STORE_URL", "postgresql://maas:hunter2@127.0.0.1:1/nowhere")
    with pytest.raises(MaasInputError, match=r"MAAS_STORE_URL: cannot reach .*127\.0\.0\.1:1") as raised:
        connect()
    assert "hunter2" not in str(raised.value)
