"""Metering survives a killed worker: each request is journaled before its answer, and journals are
brought into the service store exactly once, whoever brings them in and however often."""

from __future__ import annotations

import socket
import threading

import orjson

from deployments.metering import LogBudget, Meter, MeterJournal
from maas.api_keys import create_key
from maas.service_store import apply_journals, connect, meter_folder, read_predictions, usage_report


def record(key_id: str, rows: int = 2, status: int = 200, logged: bool = False, request_id: str | None = None) -> bytes:
    """A journal line; request_id: the caller's X-Request-Id (a retry with it is billed once)."""
    entry = {"k": key_id, "r": rows, "s": status, "t": 1_800_000_000.0, "m": "m/1@champion", "i": request_id or f"r{rows}"}
    if request_id:
        entry["c"] = 1
    if logged:
        entry.update(q='{"rows": []}', a="[]")
    return orjson.dumps(entry) + b"\n"


def test_a_dead_workers_journal_is_applied_once_even_by_two_processes_at_once(maas_home):
    folder = meter_folder()
    folder.mkdir(parents=True)
    dead = folder / f"{socket.gethostname()}~999999~1.00~000000.journal"  # a worker on this host, its PID gone
    dead.write_bytes(record("a") * 500 + record("a", logged=True) + b'{"k": "a", "r"')  # the last line cut by the kill
    first, second = connect(), connect()
    applied = []
    threads = [threading.Thread(target=lambda c=c: applied.append(apply_journals(c, folder))) for c in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(applied) == [0, 501]
    (usage,) = usage_report(first)
    assert (usage["requests"], usage["rows"]) == (501, 1002)
    assert len(read_predictions(first)) == 1
    assert dead.exists()  # its cut line is kept, in case the rest of it is still being written
    dead.write_bytes(dead.read_bytes()[:-len(b'{"k": "a", "r"')])  # as if the line had never begun
    assert apply_journals(first, folder) == 0 and not dead.exists()
    assert usage_report(first)[0]["requests"] == 501


def test_the_meter_journals_before_the_answer_and_the_flush_brings_it_in(maas_home):
    connection = connect()
    key, _ = create_key(connection, "p", "pro")
    meter = Meter(sample=1.0, flush_every_s=3600)
    meter.record(key.key_id, 3, 200, "m/1@champion", "req-1", b'{"rows": [{"x": 1}]}', b"[]")
    meter.record(key.key_id, 0, 400, "m/1@champion")
    lines = meter.journal.path.read_bytes().splitlines()
    assert [orjson.loads(line)["s"] for line in lines] == [200, 400]  # on disk before any flush
    assert usage_report(connection) == []
    meter.flush()
    meter.flush()  # nothing twice
    (usage,) = usage_report(connection)
    assert (usage["requests"], usage["rows"], usage["errors"]) == (2, 3, 1)
    (logged,) = read_predictions(connection)
    assert logged["request_id"] == "req-1" and logged["inputs"] == [{"x": 1}]
    assert meter.journal.path.exists()  # still being written


def test_a_full_journal_is_rotated_and_the_finished_one_removed(maas_home, monkeypatch):
    monkeypatch.setattr(MeterJournal, "ROTATE_BYTES", 200)
    meter = Meter(sample=0.0, flush_every_s=3600)
    first = meter.journal.path
    for _ in range(5):
        meter.record("k", 1, 200, "m/1")
    meter.flush()
    assert meter.journal.path != first and not first.exists()
    meter.record("k", 1, 200, "m/1")
    meter.flush()
    assert usage_report(connect())[0]["requests"] == 6


def test_opening_the_store_twice_in_a_process_keeps_it_working_when_another_process_closes_it(maas_home):
    """Closing any descriptor of a file drops all of a process's POSIX locks on it: an open-and-close
    of service.db by a second connect() let another process's close delete the WAL under the first
    connection ("disk I/O error"), and the service's meter stopped bringing usage in."""
    import subprocess
    import sys

    first = connect()
    with first:
        first.execute("INSERT INTO meter_journals VALUES ('a', 1)")
    second = connect()
    subprocess.run([sys.executable, "-c", "from maas.service_store import connect; connect().close()"], check=True)
    with first:
        first.execute("INSERT INTO meter_journals VALUES ('b', 2)")
    assert second.execute("SELECT COUNT(*) FROM meter_journals").fetchone() == (2,)
    assert connect().execute("SELECT COUNT(*) FROM meter_journals").fetchone() == (2,)


def test_the_prediction_log_takes_a_minutes_rows_at_once_then_its_rate_whatever_the_request_size():
    now = [0.0]
    budget = LogBudget(600, clock=lambda: now[0])  # 10 rows a second, 600 at once
    assert [budget.take(rows) for rows in (500, 90, 64)] == [True, True, True]  # a request may overdraw it
    assert not budget.take(1)  # below zero: nothing, large or small, until it refills
    now[0] += 5.6  # 56 rows back: above zero again
    assert budget.take(1000) and not budget.take(1)
    now[0] += 3600  # an idle hour refills a minute's worth, no more
    assert budget.take(600) and not budget.take(1)
    unbounded = LogBudget(None)
    assert all(unbounded.take(10**6) for _ in range(100))


def test_usage_counts_every_request_while_the_log_keeps_its_budget(maas_home):
    connection = connect()
    meter = Meter(sample=1.0, flush_every_s=3600, log_rows_per_minute=100)
    for index in range(5):
        meter.record("k", 64, 200, "m/1", f"req-{index}", b'{"rows": []}', b"[]")
    meter.flush()
    assert usage_report(connection)[0]["rows"] == 320
    assert [entry["request_id"] for entry in read_predictions(connection)] == ["req-0", "req-1"]
