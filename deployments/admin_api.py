"""Management over HTTP, for keys with the right scope: a caller's own usage and bill (`read:usage`),
and key management, the audit trail and every key's bill (`admin`). The CLI does the same for the
local operator, who holds the store itself.

  GET  /usage[?month=YYYY-MM]            the caller's usage and invoice for the month (default: this one)
  GET  /admin/keys                       every key
  POST /admin/keys                       {"name", "tier", "scopes": [...], "expires_in_days"} -> the key, once
  POST /admin/keys/<id>/revoke           {"reason"}
  POST /admin/keys/<id>/rotate           {"grace_s"} -> the new secret, once
  GET  /admin/audit[?limit=N]            the audit trail; /admin/audit/verify checks its hash chain
  GET  /admin/bill?month=YYYY-MM         every key's invoice
  POST /admin/promote                    {"model", "version", "alias", "reason"}: an alias moved by hand
  POST /admin/rollback                   {"model", "alias", "reason"}: back to the version it replaced

The alias moves need the MLflow registry the service was started from (`maas serve` has it; a Bento
served on its own does not: 409).

Each change is written to the audit trail with the calling key as the actor. These calls are rare,
so each opens its own store connection on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from urllib.parse import parse_qs

import orjson

from maas import audit
from maas.api_keys import Grant, create_key, list_keys, parse_scopes, revoke_key, rotate_key
from maas.billing import billing_period, monthly_invoices
from maas.config import ServingConfig, checked_alias
from maas.errors import MaasInputError
from maas.service_store import connect, current_month, iso, usage_report

USAGE_PATH = "/usage"
MAX_DAYS = 36_500  # an expiry or grace period past this is a mistake, and past year 9999 a crash
ADMIN_PREFIX = "/admin/"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def needed_scope(path: str) -> str | None:
    if path == USAGE_PATH:
        return "read:usage"
    if path.startswith(ADMIN_PREFIX):
        return "admin"
    return None


def json_text(value) -> str:
    return orjson.dumps(value).decode()[:80]


def _json_body(body: bytes) -> dict:
    try:
        parsed = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        raise ApiError(400, "body: not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "body: expected a JSON object")
    return parsed


def _key_json(key) -> dict:
    return {**asdict(key), "scopes": list(key.scopes), "created_at": iso(key.created_at),
            "expires_at": iso(key.expires_at) if key.expires_at else None,
            "revoked_at": iso(key.revoked_at) if key.revoked_at else None, "state": key.state}


def _create(connection, settings: ServingConfig, body: dict, actor: str) -> tuple[int, dict]:
    name, tier, scopes = body.get("name"), body.get("tier", "free"), body.get("scopes")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise ApiError(400, "name: required, the key's holder (text, 200 characters at most)")
    if not isinstance(tier, str) or tier not in settings.tiers:
        raise ApiError(400, f"tier {json_text(tier)}: not a tier of this service ({', '.join(settings.tiers)})")
    days = body.get("expires_in_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days <= MAX_DAYS):
        raise ApiError(400, f"expires_in_days: a number of days above 0, {MAX_DAYS} at most")
    if scopes is not None and (not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes)):
        raise ApiError(400, "scopes: a list of scope names, e.g. [\"predict\"]")
    try:
        scopes = parse_scopes(scopes)
    except MaasInputError as error:
        raise ApiError(400, str(error).replace("--scope", "scopes")) from None
    key, plain = create_key(connection, name, tier, scopes, time.time() + days * 86_400 if days else None, actor)
    return 201, {**_key_json(key), "key": plain, "note": "shown once: only its hash is stored"}


def _key_action(connection, settings: ServingConfig, path: str, body: dict, actor: str) -> tuple[int, dict]:
    key_id, _, action = path.removeprefix(ADMIN_PREFIX + "keys/").partition("/")
    if action == "revoke":
        if not revoke_key(connection, key_id, str(body.get("reason", ""))[:500], actor):
            raise ApiError(404, f"key '{key_id}': no such active key")
        return 200, {"key_id": key_id, "state": "revoked"}
    if action == "rotate":
        grace = body.get("grace_s", settings.key_rotation_grace_s)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_DAYS * 86_400:
            raise ApiError(400, "grace_s: seconds the old secret keeps working, 0 or more")
        plain = rotate_key(connection, key_id, float(grace), actor)
        if plain is None:
            raise ApiError(404, f"key '{key_id}': no such active key")
        return 200, {"key_id": key_id, "key": plain, "old_secret_valid_until": iso(time.time() + grace)}
    raise ApiError(404, f"{path}: not a key action (revoke, rotate)")


def _move_alias(action: str, body: dict, actor: str) -> dict:
    """POST /admin/promote or /admin/rollback: maas promote / maas rollback, with the key as actor."""
    fields = {"model": body.get("model"), "alias": body.get("alias", "champion"), "reason": body.get("reason", "")}
    if action == "promote":
        fields["version"] = body.get("version")
    if isinstance(fields.get("version"), int) and not isinstance(fields["version"], bool):
        fields["version"] = str(fields["version"])
    bad = [name for name, value in fields.items() if not isinstance(value, str) or (name != "reason" and not value.strip())]
    if bad:
        raise ApiError(400, f"{bad[0]}: required text" + (", e.g. maas-wine" if bad[0] == "model" else ""))
    from maas.registered import promote, rollback
    from maas.tracking import mlflow_client

    try:
        client = mlflow_client()
    except Exception as error:  # noqa: BLE001 - a Bento served without MLflow or its store
        raise ApiError(409, f"no model registry here ({error.__class__.__name__}): move aliases with maas promote") from None
    model, alias, reason = fields["model"], fields["alias"], fields["reason"][:500]
    if not fields.get("version", "1").isdigit():
        raise ApiError(400, f"version {json_text(fields['version'])}: a version is a number")
    try:
        checked_alias(alias)
    except ValueError as error:
        raise ApiError(400, str(error)) from None
    from mlflow.exceptions import MlflowException

    try:
        if action == "promote":
            before = promote(client, model, fields["version"], alias, reason, actor)
            return {"alias": f"{model}@{alias}", "before": f"v{before}" if before else None, "after": f"v{fields['version']}"}
        current, previous = rollback(client, model, alias, reason, actor)
    except MlflowException as error:
        raise ApiError(409, f"model registry: {str(error).splitlines()[0][:300]}") from None
    return {"alias": f"{model}@{alias}", "before": f"v{current}", "after": f"v{previous}"}


def _month(query: dict) -> str:
    month = query.get("month", [current_month()])[0]
    try:
        billing_period(month)
    except MaasInputError:
        raise ApiError(400, f"month '{month}': expected YYYY-MM") from None
    return month


def answer(method: str, path: str, query_string: str, body: bytes, grant: Grant, settings: ServingConfig
           ) -> tuple[int, dict | list]:
    """(status, JSON) for a management request from a caller already known to hold the path's scope."""
    query, actor = parse_qs(query_string), f"key {grant.key_id}"
    connection = connect()
    try:
        if path == USAGE_PATH and method == "GET":
            month = _month(query)
            lines = [line for line in monthly_invoices(connection, month, settings.tiers) if line.key_id == grant.key_id]
            return 200, {"key_id": grant.key_id, "usage": [row for row in usage_report(connection, month)
                                                           if row["key_id"] == grant.key_id],
                         "invoice": lines[0].as_json() if lines else None}
        if path == ADMIN_PREFIX + "keys" and method == "GET":
            return 200, [_key_json(key) for key in list_keys(connection)]
        if path == ADMIN_PREFIX + "keys" and method == "POST":
            return _create(connection, settings, _json_body(body), actor)
        if path.startswith(ADMIN_PREFIX + "keys/") and method == "POST":
            return _key_action(connection, settings, path, _json_body(body), actor)
        if path == ADMIN_PREFIX + "audit" and method == "GET":
            limit = query.get("limit", ["100"])[0]
            if not limit.isdigit():
                raise ApiError(400, f"limit '{limit}': a whole number")
            return 200, [entry.as_dict() for entry in audit.entries(connection, limit=int(limit) or None)]
        if path == ADMIN_PREFIX + "audit/verify" and method == "GET":
            verdict = audit.verify(connection)
            return 200, {"intact": verdict.intact, "entries": verdict.entries, "head": verdict.head,
                         "problems": verdict.problems}
        if path in (ADMIN_PREFIX + "promote", ADMIN_PREFIX + "rollback") and method == "POST":
            return 200, _move_alias(path.removeprefix(ADMIN_PREFIX), _json_body(body), actor)
        if path == ADMIN_PREFIX + "bill" and method == "GET":
            return 200, [line.as_json() for line in monthly_invoices(connection, _month(query), settings.tiers)]
        raise ApiError(404, f"{method} {path}: no such management call (see GET /metadata)")
    except MaasInputError as error:
        raise ApiError(409, str(error)) from None
    finally:
        connection.close()


async def answer_async(method: str, path: str, query_string: str, body: bytes, grant: Grant,
                       settings: ServingConfig) -> tuple[int, dict | list]:
    return await asyncio.to_thread(answer, method, path, query_string, body, grant, settings)
