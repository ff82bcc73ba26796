"""Selling the model safely, in-process through the gate: key format and checksum, scopes, expiry,
rotation with overlap, rate-limit headers, keyed /metadata and /metrics, management over HTTP, the
privacy policies of the prediction log, its purge, and bills exact to the cent."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from cryptography.fernet import Fernet

from maas import audit
from maas.api_keys import KEY_LENGTH, create_key, hash_key, new_secret, revoke_key, rotate_key, well_formed
from maas.billing import monthly_invoices
from maas.cli import main
from maas.config import PriceConfig, PrivacyConfig, TierConfig
from maas.errors import MaasInputError
from maas.privacy import HASH_PREFIX, LogRedactor, purge_predictions
from maas.service_store import connect, current_month, read_predictions, usage_report
from tests.unit.test_gate import call, gate_for, wine  # noqa: F401 - wine is a fixture

SALT, FERNET_KEY = "pepper-" * 4, Fernet.generate_key().decode()


def predict(gate, key: str | None, rows, headers: dict | None = None):
    sent = {**({"X-API-Key": key} if key else {}), **(headers or {})}
    return call(gate, [("POST", "/predict", {"json": {"rows": rows}, "headers": sent})])[0]


def test_keys_have_a_checksum_that_rejects_lookalikes_offline():
    keys = {new_secret() for _ in range(500)}
    assert len(keys) == 500 and all(len(key) == KEY_LENGTH and well_formed(key) for key in keys)
    key = next(iter(keys))
    swapped = key[:-1] + ("A" if key[-1] != "A" else "B")
    typo = key[:10] + ("x" if key[10] != "x" else "y") + key[11:]
    assert not any(well_formed(bad) for bad in (swapped, typo, key[:-1], key + "0", "sk-" + key[5:], key.replace("maas_", "maaz_"),
                                               key[:20] + "-" + key[21:]))


def test_malformed_unknown_expired_rotated_out_revoked_and_wrong_scope_keys_are_refused(wine, maas_home):
    bundle, rows = wine
    store = connect()
    gate = gate_for(bundle)
    _, good = create_key(store, "good", "pro")
    _, admin_only = create_key(store, "ops", "pro", ("admin",))
    _, expired = create_key(store, "old", "pro", expires_at=time.time() - 1)
    rotated, first_secret = create_key(store, "rotating", "pro")
    revoked, gone = create_key(store, "gone", "pro")
    assert predict(gate, first_secret, rows[:1]).status_code == 200
    second_secret = rotate_key(store, rotated.key_id, grace_s=3600)
    assert revoke_key(store, revoked.key_id, "test")
    assert predict(gate, second_secret, rows[:1]).status_code == 200  # a new secret works at once
    assert predict(gate, first_secret, rows[:1]).status_code == 200  # the old one, through its grace period
    third_secret = rotate_key(store, rotated.key_id, grace_s=0)
    time.sleep(1.2)  # the meter thread reloads the keys every second
    answers = {name: predict(gate, key, rows[:1]) for name, key in [
        ("good", good), ("malformed", "maas_" + "x" * 38), ("unknown", new_secret()), ("expired", expired),
        ("rotated out", second_secret), ("rotated out twice", first_secret), ("current", third_secret),
        ("revoked", gone), ("admin only", admin_only), ("none", None)]}
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"good": 200, "malformed": 401, "unknown": 401, "expired": 401, "rotated out": 401,
                        "rotated out twice": 401, "current": 200, "revoked": 401, "admin only": 403, "none": 401}
    errors = {name: answer.json().get("error", "") for name, answer in answers.items() if answer.status_code != 200}
    assert "malformed" in errors["malformed"] and "expired at" in errors["expired"]
    assert "rotated out at" in errors["rotated out"] and "lacks scope 'predict'" in errors["admin only"]
    actions = [entry.action for entry in audit.entries(store, "key")]
    assert actions.count("key.create") == 5 and actions.count("key.rotate") == 2 and "key.revoke" in actions


def test_the_gate_keeps_the_hash_of_well_formed_keys_only_and_of_a_bounded_number(wine, maas_home, monkeypatch):
    """A client's key is checked and hashed once, not per request; a malformed key is never kept,
    and past the bound the kept hashes start over. Validity is still looked up per request (the
    rotation and revocation cases above go through the kept hashes)."""
    import deployments.gate as gate_module

    bundle, rows = wine
    gate = gate_for(bundle)
    _, good = create_key(connect(), "good", "pro")
    monkeypatch.setattr(gate_module, "MAX_REMEMBERED_SECRETS", 2)
    assert predict(gate, "maas_" + "x" * 38, rows[:1]).status_code == 401 and gate.hashes == {}
    assert predict(gate, good, rows[:1]).status_code == 200 and gate.hashes == {good: hash_key(good)}
    unknown = [new_secret() for _ in range(2)]
    assert [predict(gate, key, rows[:1]).status_code for key in unknown] == [401, 401]
    assert gate.hashes == {unknown[1]: hash_key(unknown[1])}  # the third key found the bound reached
    assert predict(gate, good, rows[:1]).status_code == 200


def test_every_predict_answer_carries_its_rate_limit(wine, maas_home):
    bundle, rows = wine
    _, free = create_key(connect(), "f", "free")  # 2 requests a minute in gate_for's tiers
    gate = gate_for(bundle)
    first, bad, limited = predict(gate, free, rows[:1]), predict(gate, free, [{"nope": 1}]), predict(gate, free, rows[:1])
    assert [first.status_code, bad.status_code, limited.status_code] == [200, 400, 429]
    assert [answer.headers["x-ratelimit-remaining"] for answer in (first, bad, limited)] == ["1", "0", "0"]
    assert all(answer.headers["x-ratelimit-limit"] == "2" for answer in (first, bad, limited))
    assert 25 <= int(limited.headers["x-ratelimit-reset"]) <= 60 and int(limited.headers["retry-after"]) >= 1
    assert first.headers["ratelimit-policy"] == '"free";q=2;w=60' and first.headers["ratelimit"].startswith('"free";r=1;t=')


def test_every_answer_carries_the_security_headers_and_hsts_on_https(wine, maas_home):
    from maas.config import TLSConfig

    plain = call(gate_for(wine[0], auth=False), [("POST", "/predict", {"json": {"rows": wine[1][:1]}}),
                                                 ("GET", "/docs", {}), ("POST", "/predict", {"json": {}})])
    assert all(answer.headers["x-content-type-options"] == "nosniff" and answer.headers["cache-control"] == "no-store"
               and "strict-transport-security" not in answer.headers for answer in plain)
    (secure,) = call(gate_for(wine[0], auth=False, tls=TLSConfig(certfile="c.pem", keyfile="k.pem")),
                     [("GET", "/metadata", {})])
    assert secure.headers["strict-transport-security"] == "max-age=31536000"


def test_metadata_and_metrics_can_require_a_key(wine, maas_home):
    store = connect()
    _, caller = create_key(store, "caller", "pro")
    _, reader = create_key(store, "reader", "pro", ("read:usage",))
    closed = gate_for(wine[0], public_endpoints=[])
    answers = call(closed, [("GET", "/metadata", {}), ("GET", "/metadata", {"headers": {"X-API-Key": caller}}),
                            ("GET", "/metrics", {"headers": {"X-API-Key": caller}}),
                            ("GET", "/metrics", {"headers": {"X-API-Key": reader}}), ("GET", "/livez", {})])
    assert [answer.status_code for answer in answers] == [401, 200, 403, 404, 404]  # 404: passed on to BentoML
    opened = call(gate_for(wine[0]), [("GET", "/metadata", {}), ("GET", "/metrics", {})])
    assert [answer.status_code for answer in opened] == [200, 404]


def test_management_over_http_needs_the_admin_scope_and_is_audited(wine, maas_home):
    bundle, rows = wine
    store = connect()
    admin_key, admin = create_key(store, "ops", "pro", ("admin",))
    _, caller = create_key(store, "caller", "pro", ("predict", "read:usage"))
    gate = gate_for(bundle)
    as_admin, as_caller = {"X-API-Key": admin}, {"X-API-Key": caller}
    created, refused, bad = call(gate, [
        ("POST", "/admin/keys", {"json": {"name": "new", "tier": "pro", "expires_in_days": 30}, "headers": as_admin}),
        ("POST", "/admin/keys", {"json": {"name": "sneaky", "tier": "pro"}, "headers": as_caller}),
        ("POST", "/admin/keys", {"json": {"name": "x", "tier": "gold"}, "headers": as_admin})])
    assert created.status_code == 201 and refused.status_code == 403 and bad.status_code == 400, bad.text
    new_key, new_id = created.json()["key"], created.json()["key_id"]
    assert predict(gate, new_key, rows[:2]).status_code == 200  # works at once
    rotated, listed, unknown = call(gate, [
        ("POST", f"/admin/keys/{new_id}/rotate", {"json": {"grace_s": 0}, "headers": as_admin}),
        ("GET", "/admin/keys", {"headers": as_admin}), ("GET", "/admin/nothing", {"headers": as_admin})])
    assert rotated.status_code == 200 and unknown.status_code == 404
    assert {key["name"] for key in listed.json()} == {"ops", "caller", "new"}
    time.sleep(1.2)
    assert predict(gate, new_key, rows[:1]).status_code == 401 and predict(gate, rotated.json()["key"], rows[:1]).status_code == 200
    (revoked,) = call(gate, [("POST", f"/admin/keys/{new_id}/revoke", {"json": {"reason": "done"}, "headers": as_admin})])
    assert revoked.status_code == 200
    gate.meter.flush()
    usage, trail, verdict = call(gate, [("GET", "/usage", {"headers": as_caller}), ("GET", "/admin/audit", {"headers": as_admin}),
                                        ("GET", "/admin/audit/verify", {"headers": as_admin})])
    assert usage.status_code == 200 and usage.json()["key_id"] != new_id and usage.json()["usage"] == []
    by_admin = [entry for entry in trail.json() if entry["actor"] == f"key {admin_key.key_id}"]
    assert [entry["action"] for entry in by_admin] == ["key.create", "key.rotate", "key.revoke"]
    assert verdict.json()["intact"] is True


def test_logged_inputs_follow_their_privacy_policy(wine, maas_home, monkeypatch):
    bundle, rows = wine
    policy = {"alcohol": "hash", "magnesium": "drop", "proline": "mask", "hue": "encrypt"}
    with pytest.raises(MaasInputError, match="MAAS_LOG_HASH_SALT"):
        gate_for(bundle, auth=False, privacy=PrivacyConfig(columns=policy))
    monkeypatch.setenv("MAAS_LOG_HASH_SALT", SALT)
    monkeypatch.setenv("MAAS_LOG_ENCRYPTION_KEY", FERNET_KEY)
    gate = gate_for(bundle, auth=False, privacy=PrivacyConfig(columns=policy))
    sent = [rows[0], rows[0], *rows[1:4]]
    assert predict(gate, None, sent).status_code == 200
    gate.meter.flush()
    (logged,) = read_predictions(connect())
    inputs = logged["inputs"]
    assert all(row["alcohol"].startswith(HASH_PREFIX) and str(sent_row["alcohol"]) not in row["alcohol"]
               and "magnesium" not in row for row, sent_row in zip(inputs, sent))
    assert inputs[0]["alcohol"] == inputs[1]["alcohol"] != inputs[2]["alcohol"]  # equal values still match
    assert all(row["proline"].endswith(json.dumps(sent_row["proline"])[-4:]) and row["proline"].startswith("*")
               for row, sent_row in zip(inputs, sent))
    redactor = LogRedactor(PrivacyConfig(columns=policy))
    assert [redactor.decrypt(row["hue"]) for row in inputs] == [row["hue"] for row in sent]
    assert inputs[0]["flavanoids"] == sent[0]["flavanoids"]  # kept as sent


def test_purge_deletes_logged_inputs_and_keeps_usage(wine, maas_home):
    bundle, rows = wine
    store = connect()
    _, key = create_key(store, "k", "pro")
    gate = gate_for(bundle)
    for _ in range(3):
        assert predict(gate, key, rows[:2]).status_code == 200
    gate.meter.flush()
    before = usage_report(store)
    assert len(read_predictions(store)) == 3
    assert purge_predictions(store, retention_days=30) == 0  # all recent
    assert purge_predictions(store, retention_days=30, now=time.time() + 31 * 86_400) == 3
    assert read_predictions(store) == [] and usage_report(store) == before and before[0]["rows"] == 6
    assert audit.entries(store, "log.purge")[0].before.startswith("3 logged request(s)")


def test_a_bill_over_known_requests_is_exact_to_the_cent_and_retries_are_billed_once(wine, maas_home, capsys):
    bundle, rows = wine
    store = connect()
    priced = TierConfig(requests_per_minute=1000, monthly_rows=10_000,
                        price=PriceConfig(monthly_base=Decimal("9.99"), included_rows=3, per_1k_rows=Decimal("12.345")))
    tiers = {"free": TierConfig(requests_per_minute=2, monthly_rows=10), "pro": priced}
    buyer, key = create_key(store, "buyer", "pro")
    idle, _ = create_key(store, "idle", "pro")
    workers = [gate_for(bundle, tiers=tiers), gate_for(bundle, tiers=tiers)]  # two service workers
    retry = {"X-Request-Id": "order-17"}
    answers = [predict(workers[0], key, rows[:8]), predict(workers[1], key, rows[:1]),
               predict(workers[0], key, rows[:3], retry), predict(workers[1], key, rows[:3], retry),
               predict(workers[0], key, [{"nope": 1}])]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200, 400]
    for worker in workers:
        worker.meter.flush()
    month = current_month()
    lines = {line.key_id: line for line in monthly_invoices(store, month, tiers)}
    # 8 + 1 + 3 rows (the retry of order-17 not again); 3 included: 9 billable x 12.345 / 1000 = 0.111105
    assert (lines[buyer.key_id].rows, lines[buyer.key_id].billable_rows) == (12, 9)
    assert (lines[buyer.key_id].usage_charge, lines[buyer.key_id].total) == (Decimal("0.11"), Decimal("10.10"))
    assert lines[idle.key_id].total == Decimal("9.99")  # the base price, with no use
    config = maas_home / "priced.yaml"
    config.write_text(json.dumps({"serving": {"tiers": {name: tier.model_dump(mode="json") for name, tier in tiers.items()}}}))
    assert main(["bill", "--month", month, "--config", str(config), "--json", "--out", str(maas_home / "bills")]) == 0
    billed = {line["key_id"]: line for line in json.loads(capsys.readouterr().out)}
    assert billed[buyer.key_id]["total"] == "10.10" and billed[idle.key_id]["total"] == "9.99"
    assert {path.suffix for path in (maas_home / "bills").iterdir()} == {".json", ".csv", ".html"}
    assert "10.10 USD" in (maas_home / "bills" / f"invoices-{month}.html").read_text()


def test_fuzzed_management_calls_never_get_a_5xx(wine, maas_home):
    """Any JSON, any path under /admin/, any query: 4xx with a message or an answer, never a 5xx."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    _, admin = create_key(connect(), "ops", "pro", ("admin", "read:usage"))
    gate = gate_for(wine[0])
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                             max_leaves=8)
    bodies = st.fixed_dictionaries({}, optional={
        "name": documents, "tier": documents, "scopes": documents, "expires_in_days": documents, "grace_s": documents,
        "reason": documents, "model": documents, "version": documents, "alias": documents}) | documents
    paths = st.sampled_from(["/admin/keys", "/admin/keys/x/rotate", "/admin/keys/x/revoke", "/admin/audit", "/admin/bill",
                             "/usage", "/admin/audit/verify", "/admin/", "/admin/promote", "/admin/rollback"]) | st.text(
        "abcxyz0189-_/~", max_size=15).map(lambda tail: "/admin/" + tail)  # no '.' or '%': httpx resolves "/admin/.." to "/"
    statuses = []

    @given(method=st.sampled_from(["GET", "POST", "DELETE"]), path=paths, body=bodies,
           query=st.sampled_from(["", "month=2026-13", "month=x", "limit=-1", "limit=5", "month=2026-12"]))
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(method, path, body, query):
        (answer,) = call(gate, [(method, path, {"content": json.dumps(body), "params": query,
                                                "headers": {"X-API-Key": admin}})])
        statuses.append(answer.status_code)
        assert answer.status_code < 500 and (answer.status_code < 400 or answer.json()["error"]), (path, body, answer.text)

    check()
    assert {200, 201} & set(statuses) and {400, 404} <= set(statuses)


def test_aliases_move_over_http_with_the_admin_key_as_actor(wine, maas_home, tmp_path):
    from maas.tracking import mlflow_client

    client = mlflow_client()
    client.create_registered_model("maas-demo")
    for _ in range(2):
        client.create_model_version("maas-demo", source=str(tmp_path))
    client.set_registered_model_alias("maas-demo", "champion", "1")
    admin_key, admin = create_key(connect(), "ops", "pro", ("admin",))
    _, caller = create_key(connect(), "caller", "pro")
    gate, as_admin = gate_for(wine[0]), {"X-API-Key": admin}
    promoted, refused, missing = call(gate, [
        ("POST", "/admin/promote", {"json": {"model": "maas-demo", "version": 2, "reason": "A/B won"}, "headers": as_admin}),
        ("POST", "/admin/rollback", {"json": {"model": "maas-demo"}, "headers": {"X-API-Key": caller}}),
        ("POST", "/admin/promote", {"json": {"model": "maas-nothing", "version": "1"}, "headers": as_admin})])
    assert promoted.status_code == 200 and promoted.json() == {"alias": "maas-demo@champion", "before": "v1", "after": "v2"}
    assert refused.status_code == 403 and missing.status_code == 409
    reserved = call(gate, [("POST", "/admin/promote", {"json": {"model": "maas-demo", "version": "1", "alias": alias},
                                                       "headers": as_admin}) for alias in ("latest", "v3", "a b")])
    assert [response.status_code for response in reserved] == [400, 400, 400]
    assert "reserved by MLflow" in reserved[0].json()["error"] and "letters, digits" in reserved[2].json()["error"]
    (rolled,) = call(gate, [("POST", "/admin/rollback", {"json": {"model": "maas-demo", "reason": "worse live"},
                                                          "headers": as_admin})])
    assert rolled.json()["after"] == "v1" and str(client.get_model_version_by_alias("maas-demo", "champion").version) == "1"
    moves = [(entry.actor, entry.action, entry.after) for entry in audit.entries(connect(), "alias")]
    assert moves == [(f"key {admin_key.key_id}", "alias.promote", "v2"), (f"key {admin_key.key_id}", "alias.rollback", "v1")]


def test_keys_issued_before_scopes_keep_working_after_the_upgrade(wine, maas_home):
    """A store from before scopes and rotation: its keys move to the new tables on first open, keep
    working with scope predict, and rotation gives them the checksummed format."""
    import secrets
    import sqlite3

    from maas.api_keys import hash_key, list_keys

    legacy = "maas_" + secrets.token_urlsafe(24)
    maas_home.mkdir(parents=True)
    old = sqlite3.connect(maas_home / "service.db")
    old.execute("CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, name TEXT NOT NULL, "
                "tier TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT)")
    old.executemany("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?)", [
        ("0a0b0c0d", hash_key(legacy), "early", "pro", "2026-10-01T08:00:00+00:00", None),
        ("0e0f1011", hash_key("maas_" + secrets.token_urlsafe(24)), "gone", "pro", "2026-10-01T08:00:00+00:00",
         "2026-11-01T08:00:00+00:00")])
    old.commit()
    old.close()
    store = connect()
    assert [(key.key_id, key.scopes, key.state) for key in list_keys(store)] == [
        ("0a0b0c0d", ("predict",), "active"), ("0e0f1011", ("predict",), "revoked")]
    assert connect().execute("SELECT COUNT(*) FROM keys").fetchone() == (2,)  # migrated once
    gate = gate_for(wine[0])
    assert predict(gate, legacy, wine[1][:1]).status_code == 200
    fresh = rotate_key(store, "0a0b0c0d", grace_s=0)
    assert well_formed(fresh) and len(fresh) == KEY_LENGTH and predict(gate, fresh, wine[1][:1]).status_code == 200
