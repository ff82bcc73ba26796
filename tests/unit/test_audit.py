"""The audit trail: hash-chained, one chain across concurrent writers, and an edit, a deletion or a
cut-off end found by `maas audit verify`; alias moves by hand (`maas promote`, `maas rollback`) on a
real MLflow registry are written to it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from maas import audit
from maas.cli import main
from maas.service_store import connect

APPENDER = """
import sys
from maas import audit
from maas.service_store import connect
connection = connect()
for number in range(int(sys.argv[2])):
    audit.append(connection, "test.write", f"writer {sys.argv[1]}", number, number + 1, actor=f"writer {sys.argv[1]}")
"""


def test_concurrent_writers_form_one_intact_chain(maas_home):
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(index), "40"]) for index in range(3)]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0]
    connection = connect()
    verdict = audit.verify(connection)
    assert verdict.intact and verdict.entries == 120, verdict.problems
    assert [entry.seq for entry in audit.entries(connection)] == list(range(1, 121))


@pytest.fixture
def trail(maas_home):
    connection = connect()
    for number in range(5):
        audit.append(connection, "key.create", f"key k{number}", None, {"tier": "pro"}, "onboarding", "alice@host")
    return connection


def test_an_edit_is_found(trail, capsys):
    with trail:
        trail.execute("UPDATE audit_log SET actor = 'mallory@host' WHERE seq = 2")
    verdict = audit.verify(trail)
    assert not verdict.intact and verdict.problems == ["entry 2: its content does not match its hash (it was edited)"]
    assert main(["audit", "verify"]) == 1
    assert "TAMPERED" in capsys.readouterr().out


def test_an_edit_that_rehashes_its_entry_breaks_the_next_link(trail):
    entry = audit.entries(trail)[1]
    forged = audit.Entry(*entry.content()[:2], "mallory@host", *entry.content()[3:], entry.previous_hash, "")
    new_hash = audit.chained_hash(entry.previous_hash, forged.content())
    with trail:
        trail.execute("UPDATE audit_log SET actor = 'mallory@host', entry_hash = ? WHERE seq = 2", (new_hash,))
    assert audit.verify(trail).problems == ["entry 3: does not follow the entry before it (one was changed or deleted)"]


def test_a_deletion_is_found(trail):
    with trail:
        trail.execute("DELETE FROM audit_log WHERE seq = 3")
    problems = audit.verify(trail).problems
    assert problems[0].startswith("entry 3: missing") and any("does not follow" in problem for problem in problems)


def test_cutting_off_the_end_is_found_by_the_head_kept_elsewhere(trail, capsys):
    assert main(["audit", "verify", "--json"]) == 0
    head = json.loads(capsys.readouterr().out)["head"]
    audit.append(trail, "key.revoke", "key k1", "active", "revoked", "", "alice@host")
    with trail:  # a careful forger cuts the last two entries and rewinds the head row to match
        trail.execute("DELETE FROM audit_log WHERE seq >= 5")
        last = trail.execute("SELECT entry_hash FROM audit_log WHERE seq = 4").fetchone()[0]
        trail.execute("UPDATE audit_head SET seq = 4, entry_hash = ? WHERE id = 1", (last,))
    assert audit.verify(trail).intact  # the chain alone cannot tell...
    assert main(["audit", "verify", "--expect-head", head]) == 1  # ...the head printed earlier can
    assert "not in the chain" in capsys.readouterr().err


def test_promote_and_rollback_move_the_alias_and_are_audited(maas_home, tmp_path, capsys, monkeypatch):
    from maas.tracking import mlflow_client

    monkeypatch.setenv(audit.ACTOR_ENV, "carol@laptop")
    client = mlflow_client()
    client.create_registered_model("maas-demo")
    for _ in range(3):
        client.create_model_version("maas-demo", source=str(tmp_path))
    client.set_registered_model_alias("maas-demo", "champion", "1")
    assert main(["promote", "maas-demo", "3", "--reason", "better in March"]) == 0
    assert str(client.get_model_version_by_alias("maas-demo", "champion").version) == "3"
    assert main(["promote", "maas-demo", "3"]) == 2  # already there: one line, nothing moved
    assert main(["promote", "maas-demo", "9"]) == 2
    capsys.readouterr()
    for alias in ("blue green", "a/b", "latest", "v2"):  # MLflow refuses these: one line, not its traceback
        assert main(["promote", "maas-demo", "2", "--alias", alias]) == 2
        assert main(["rollback", "maas-demo", "--alias", alias]) == 2
    refused = capsys.readouterr().err
    assert refused.count("maas: error: --alias: alias ") == 8 and "Traceback" not in refused, refused
    assert main(["rollback", "maas-demo", "--reason", "worse live"]) == 0
    assert str(client.get_model_version_by_alias("maas-demo", "champion").version) == "1"
    assert main(["rollback", "maas-demo"]) == 2  # v1 replaced nothing
    capsys.readouterr()
    assert main(["audit", "--filter", "alias", "--json"]) == 0
    moves = [(entry["actor"], entry["action"], entry["before"], entry["after"], entry["reason"])
             for entry in json.loads(capsys.readouterr().out)]
    assert moves == [("carol@laptop", "alias.promote", "v1", "v3", "better in March"),
                     ("carol@laptop", "alias.rollback", "v3", "v1", "worse live")]
