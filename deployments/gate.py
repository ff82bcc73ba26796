"""The service's ASGI gate: POST /predict (API key, tier rate limit and quota, request size,
validation, adaptive batching, the model, metering and the prediction log) and GET /metadata.
Everything else (docs, health, metrics) passes through to BentoML.

/predict reaches it ahead of all BentoML's middleware (deployments/predict_first.py, which keeps
BentoML's metrics, access log, timeout and concurrency limit); the other paths inside them.
BentoML's own API path cost ~3 ms of CPU per request here (a no-op BentoML API peaked at ~340
requests/s on 2 cores, an answer from the gate at ~900), more than the model itself. Nothing here
needs a running server: tests drive it in-process as an ASGI app.
"""

from __future__ import annotations

import math
import os
import time
from urllib.parse import quote
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import orjson

from deployments.batcher import Batcher
from deployments.limits import open_limits
from deployments.metering import Meter, ProcessGauges
from deployments.request_reader import (INVOCATIONS_PATH, BadRequest, RequestReader, is_csv, mlflow_predictions,
                                       read_body, rows_from_csv, rows_from_mlflow_request, unread_body_dropped)
from deployments.turn_writes import writes
from maas.bundle import ModelBundle, unknown_categories
from maas.config import ServingConfig
from maas.paths import maas_home
from maas.privacy import redactor_for
from deployments.admin_api import ApiError, answer_async, needed_scope
from maas.api_keys import SCOPE_MEANING, SCOPES, Grant, hash_key, key_grant, well_formed
from maas.service_store import connect, current_month, month_bounds, rows_used

PREDICT_PATH = "/predict"
PING_PATH = "/ping"  # MLflow's health check
METADATA_PATH = "/metadata"
METRICS_PATH = "/metrics"
ANONYMOUS = "anonymous"
MAX_REMEMBERED_MISSES = 10_000  # past this many unknown keys in a second, the rest wait for the reload
MAX_REMEMBERED_SECRETS = 10_000  # presented secrets whose hash is kept (ServiceGate.secret_hash)
ANONYMOUS_GRANT = Grant(ANONYMOUS, "", frozenset(SCOPES), None, "")


class ServedModel(NamedTuple):
    bundle: ModelBundle
    label: str  # NAME/VERSION@ALIAS, in /metadata and the prediction log


@dataclass
class ServedModels:
    """The service's model and the models its tiers are served from (serving.tiers.*.model)."""

    default: ServedModel
    tiers: dict[str, ServedModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        schema, labels = self.default.bundle.metadata["input_schema"], self.default.bundle.labels
        for tier, (bundle, label) in self.tiers.items():
            if bundle.metadata["input_schema"] != schema or bundle.labels != labels:
                raise RuntimeError(f"tier '{tier}': model {label} takes other columns or predicts other labels "
                                   f"than {self.default.label}; a service's tiers must share one input schema")

    def for_tier(self, tier: str | None) -> ServedModel:
        return self.tiers.get(tier, self.default)


def load_models(default: tuple[str | Path, str], tiers: dict[str, tuple[str | Path, str]], threads: int) -> ServedModels:
    """(bundle folder, label) of the model and of each tier's -> the loaded bundles (threads: ORT's, 0 = all)."""
    def load(folder, label) -> ServedModel:
        return ServedModel(ModelBundle.load(folder, threads or None), label)

    return ServedModels(load(*default), {tier: load(*source) for tier, source in tiers.items()})


def seconds_to_next_month() -> int:
    now = time.time()
    return int(month_bounds(datetime.fromtimestamp(now, timezone.utc))[1] - now) + 1


@dataclass(frozen=True)
class Answering:
    """What answers requests: the models, the reader of their input schema, a batcher per model."""

    models: ServedModels
    reader: RequestReader
    default_batcher: Batcher
    batchers: dict[str, Batcher]

    @classmethod
    def of(cls, models: ServedModels, settings: ServingConfig, batch_rows) -> Answering:
        return cls(models, RequestReader(models.default.bundle.preprocessing, settings.strict_columns),
                   Batcher(models.default.bundle, settings.max_batch_size, batch_rows),
                   {tier: Batcher(model.bundle, settings.max_batch_size, batch_rows)
                    for tier, model in models.tiers.items()})

    def batcher(self, tier: str | None) -> Batcher:
        return self.batchers.get(tier, self.default_batcher)


class ServiceGate:
    """An ASGI app: answers /predict and /metadata, hands every other request to `app` (the service
    passes BentoML's app per request instead: `handle`)."""

    def __init__(self, app, models: ServedModels, settings: ServingConfig, metrics_registry=None):
        """metrics_registry: where the batch-size histogram, the per-model counter and the process
        gauges register (default: prometheus_client's, which /metrics serves); a test gives each gate its own."""
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = metrics_registry or REGISTRY
        self.app, self.settings = app, settings
        self.meter = Meter(settings.prediction_log_sample, gauges=ProcessGauges(registry),
                           redactor=redactor_for(settings.privacy),
                           log_rows_per_minute=settings.prediction_log_rows_per_minute)
        self.security_headers = SECURITY_HEADERS + ([HSTS] if settings.tls.enabled else [])
        self.store = connect()  # the meter's belongs to its thread
        self.missed: set[str] = set()  # unknown secrets since the meter's last reload of the keys
        self.missed_for: dict | None = None
        self.hashes: dict[str, str] = {}  # well-formed presented secret -> its SHA-256 (secret_hash)
        self.answered_by: dict[str, object] = {}  # model label -> its child of self.answered
        self.limits = open_limits(settings, maas_home() / "run",
                                  lambda key_id, month: rows_used(self.store, month).get(key_id, 0))
        self.batch_rows = Histogram("maas_batch_rows", "rows per model call (adaptive batching)", registry=registry,
                                    buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
        self.answered = Counter("maas_predictions", "requests answered 200, by the model version that answered",
                                ["model"], registry=registry)
        self.answering = Answering.of(models, settings, self.batch_rows)

    @property
    def models(self) -> ServedModels:
        return self.answering.models

    @property
    def reader(self) -> RequestReader:
        return self.answering.reader

    def swap(self, models: ServedModels) -> None:
        """Answer new requests with `models` from now on; requests already in flight finish on the
        models they started with (each request reads `self.answering` once)."""
        self.answering = Answering.of(models, self.settings, self.batch_rows)

    async def __call__(self, scope, receive, send):
        return await self.handle(scope, receive, send, self.app)

    async def handle(self, scope, receive, send, passthrough):
        if scope["type"] != "http":
            return await passthrough(scope, receive, send)
        send = with_security_headers(send, self.security_headers)
        path, method = scope["path"], scope["method"]
        if path == PREDICT_PATH and method == "POST":
            return await self.predict(scope, receive, send)
        if path == INVOCATIONS_PATH and method == "POST":
            return await self.predict(scope, receive, send, mlflow_protocol=True)
        if path == PING_PATH and method == "GET":
            return await reply(send, 200, {"status": "ok"})
        scopes = self.scopes_for(path)
        if scopes:
            headers = request_headers(scope)
            grant, refusal = self.authorize(headers, path, scopes)
            if refusal:
                return await refuse(receive, headers, send, *refusal)
            if needed_scope(path):
                return await self.manage(scope, receive, send, grant)
        if path == METADATA_PATH and method == "GET":
            return await reply(send, 200, self.metadata())
        return await passthrough(scope, receive, send)

    async def manage(self, scope, receive, send, grant: Grant):
        """A management call (deployments/admin_api.py) from a key holding its scope."""
        try:
            body = await read_body(receive, {}, self.settings.max_request_bytes)
            status, payload = await answer_async(scope["method"], scope["path"],
                                                 scope.get("query_string", b"").decode("latin-1"), body, grant, self.settings)
        except (BadRequest, ApiError) as refused:
            status, payload = refused.status, {"error": refused.message}
        return await reply(send, status, payload)

    def scopes_for(self, path: str) -> tuple[str, ...]:
        """The scopes a key needs for a path other than /predict (any one of them), or () when the
        path answers anyone: health checks, docs, and what serving.public_endpoints lists."""
        if path in self.settings.public_endpoints:
            return ()
        if path == METADATA_PATH:
            return ("predict", "admin")
        if path == METRICS_PATH:
            return ("read:usage", "admin")
        management = needed_scope(path)
        return (management, "admin") if management else ()

    def authorize(self, headers: dict[str, str], path: str, scopes: tuple[str, ...]
                  ) -> tuple[Grant | None, tuple[int, dict] | None]:
        """(the key's grant, None), or (None, (status, error)): 401 for a missing, malformed, unknown,
        expired or rotated-out key, 403 for a key without any of `scopes`. With serving.auth off
        there are no keys: every caller is anonymous, and management over HTTP is off."""
        if not self.settings.auth:
            if needed_scope(path):
                return None, (403, {"error": "serving.auth is false: no keys, so no management over HTTP"})
            return ANONYMOUS_GRANT, None
        presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not presented:
            return None, (401, {"error": "missing API key (header X-API-Key, or Authorization: Bearer)"})
        secret_hash = self.secret_hash(presented)
        if secret_hash is None:
            return None, (401, {"error": "malformed API key: expected maas_ and 38 letters or digits (checksum failed)"})
        grant = self.lookup(secret_hash)
        if grant is None:
            return None, (401, {"error": "unknown or revoked API key"})
        now = time.time()
        refusals = [grant.refusal(needed, now) for needed in scopes]
        if all(refusals):
            status, message = refusals[0]
            return None, (status, {"error": message})
        return grant, None

    def secret_hash(self, presented: str) -> str | None:
        """The SHA-256 a well-formed key is stored under, or None for a malformed one. A client sends
        the same key with every request, so its checksum is checked and its hash taken once (for up
        to MAX_REMEMBERED_SECRETS keys, held in this process's memory as the requests carrying them
        are). Whether the key is valid is still looked up on every request (lookup)."""
        known = self.hashes.get(presented)
        if known is not None:
            return known
        if not well_formed(presented):
            return None
        if len(self.hashes) >= MAX_REMEMBERED_SECRETS:
            self.hashes.clear()
        known = self.hashes[presented] = hash_key(presented)
        return known

    async def predict(self, scope, receive, send, mlflow_protocol: bool = False):
        """POST /predict; mlflow_protocol: POST /invocations, MLflow's request and answer formats
        around the same reading, limits, metering and model."""
        headers = request_headers(scope)
        key_id, tier, tier_name, limit_headers = ANONYMOUS, None, None, {}
        answering = self.answering  # one set of models for the whole request, even across a swap
        default_label = answering.models.default.label
        if self.settings.auth:
            grant, refusal = self.authorize(headers, PREDICT_PATH, ("predict",))
            if refusal:
                return await refuse(receive, headers, send, *refusal)
            key_id, tier_name = grant.key_id, grant.tier
            tier = self.settings.tiers.get(tier_name)
            if tier is None:
                return await refuse(receive, headers, send, 403,
                                    {"error": f"key {key_id} has tier '{tier_name}', which this service does not offer"})
            taken = self.limits.take(key_id, tier.requests_per_minute)
            if self.limits.awaited:  # Redis: the loop answers other requests meanwhile
                taken = await taken
            limit_headers = rate_limit_headers(tier_name, tier.requests_per_minute, taken)
            if taken.wait:
                self.meter.record(key_id, 0, 429, default_label)
                return await refuse(receive, headers, send, 429, {"error": f"rate limit of tier '{tier_name}': "
                                                                  f"{tier.requests_per_minute} requests per minute"},
                                    {"retry-after": str(max(1, round(taken.wait))), **limit_headers})
        try:
            body = await read_body(receive, headers, self.settings.max_request_bytes)
            if mlflow_protocol:
                body = rows_from_mlflow_request(body, headers.get("content-type", ""), answering.reader.text)
            elif is_csv(headers.get("content-type", "")):
                body = rows_from_csv(body, answering.reader.text)
            logged, columns, ignored = answering.reader.read(body, self.settings.max_rows_per_request)
        except BadRequest as refused:
            self.meter.record(key_id, 0, refused.status, default_label)
            return await reply(send, refused.status, {"error": refused.message, **({"detail": refused.detail} if refused.detail else {})},
                               {**refused.headers, **limit_headers})
        if tier is not None:
            fits = self.limits.reserve_rows(key_id, columns.n_rows, tier.monthly_rows, current_month())
            if self.limits.awaited:
                fits = await fits
            if not fits:
                self.meter.record(key_id, 0, 429, default_label)
                return await reply(send, 429, {"error": f"monthly quota of tier '{tier_name}' "
                                               f"({tier.monthly_rows} rows) used up"},
                                   {"retry-after": str(seconds_to_next_month()), **limit_headers})
        chosen_id = headers.get("x-request-id", "")[:128]  # the caller's: a retry with it is billed once
        request_id = chosen_id or os.urandom(16).hex()  # 128 random bits, as a uuid4's hex (a quarter of its cost)
        model = answering.models.for_tier(tier_name)
        answered = await answering.batcher(tier_name).answers(columns)
        answer = orjson.dumps(answered)  # the prediction log keeps /predict's form
        extra = {"x-maas-ignored-columns": header_list(ignored)} if ignored else {}
        reader = answering.reader
        unknown = unknown_categories(columns.categorical, reader.preprocessing, reader.category_sets)
        if unknown:
            extra["x-maas-unknown-categories"] = header_list(list(unknown))
        self.meter.record(key_id, columns.n_rows, 200, model.label, request_id, logged, answer,
                          bool(chosen_id))  # metered, then answered
        writes.inc(self.answered_child(model.label))
        await send_json(send, 200, mlflow_predictions(answered, model.bundle.typed_labels) if mlflow_protocol else answer,
                        {"x-request-id": request_id, "x-maas-model": model.label, **extra,
                                            **limit_headers})

    def answered_child(self, label: str):
        """The maas_predictions counter of one model (prometheus_client's labels() per request cost
        more than the increment)."""
        child = self.answered_by.get(label)
        if child is None:
            child = self.answered_by[label] = self.answered.labels(label)
        return child

    def lookup(self, secret_hash: str) -> Grant | None:
        """A secret's grant from the keys the meter thread reloads every second. One it has not seen
        (a key created or rotated a moment ago) is looked up in the store, so a new key works at once;
        a miss is remembered until the next reload, so unknown keys cost one lookup each per second.
        Only well-formed keys (the checksum holds) get this far."""
        keys = self.meter.keys
        grant = keys.get(secret_hash)
        if grant is not None:
            return grant
        if keys is not self.missed_for:
            self.missed, self.missed_for = set(), keys
        if secret_hash in self.missed or len(self.missed) > MAX_REMEMBERED_MISSES:
            return None
        grant = key_grant(self.store, secret_hash)
        if grant is None:
            self.missed.add(secret_hash)
        else:
            keys[secret_hash] = grant
        return grant

    def metadata(self) -> dict:
        """GET /metadata: the model behind this service, its test metrics and input schema."""
        default, settings = self.models.default, self.settings
        meta = default.bundle.metadata
        return {"model": default.label, "variant": meta.get("variant"), "labels": meta["labels"],
                "test_metrics": meta.get("metrics", {}), "input_schema": meta["input_schema"],
                # how probabilities become the label: null, the likelier class; {"threshold": t}, the second
                # class from probability t on; {"class_weights": [...]}, the likelier after weighting
                "decision": meta.get("decision"),
                # columns of the training file the model does not read; any other unknown column is ignored too
                "ignored_columns": meta.get("dropped_columns", {}), "strict_columns": settings.strict_columns,
                "missing_values": "null is a missing value, imputed as in training",
                "unknown_categories": "a value a categorical column's model has no category for reads as an unknown "
                                      "category; the answer's X-Maas-Unknown-Categories header names such columns",
                # text columns: the encoder, and the token count past which a text is truncated
                **({"text_columns": meta["text"]} if meta.get("text") else {}),
                "auth": settings.auth, "max_rows_per_request": settings.max_rows_per_request,
                # a price is a decimal string ("0.25"), so it reads back exactly
                "tiers": {name: {**tier.model_dump(mode="json"), "served_by": self.models.for_tier(name).label}
                          for name, tier in settings.tiers.items()},
                "key_scopes": SCOPE_MEANING, "public_endpoints": settings.public_endpoints,
                "request_id": "X-Request-Id: a retry with the same id is answered again but billed once"}


def request_headers(scope) -> dict[str, str]:
    """The request's headers, names in lower case, read once per request."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}


def header_list(columns: list[str]) -> str:
    """Column names, comma-separated; a space, comma, '%' or anything outside printable ASCII is
    percent-encoded, since a header is latin-1, may not start or end with a space (h11 closed the
    connection on a column named ' '), and a column name may be any text."""
    return ", ".join(quote(column, safe="!\"#$&'()*+-./:;<=>?@[\\]^_`{|}~") for column in columns)


# On every answer, the gate's and BentoML's: no MIME sniffing of a JSON answer, no cache keeping a
# prediction or a key, and on HTTPS, browsers told to stay on HTTPS for a year (OWASP's API set).
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]
HSTS = (b"strict-transport-security", b"max-age=31536000")


def with_security_headers(send, headers: list[tuple[bytes, bytes]]):
    """`send`, adding `headers` to the response's start unless the app set them itself."""
    async def sending(message):
        await send(with_headers(message, headers) if message["type"] == "http.response.start" else message)

    return sending


def with_headers(start: dict, headers: list[tuple[bytes, bytes]]) -> dict:
    """An http.response.start message with those of `headers` it does not set itself."""
    present = {name.lower() for name, _ in start.get("headers", [])}
    added = [header for header in headers if header[0] not in present]
    return {**start, "headers": [*start.get("headers", []), *added]} if added else start


# Every header of the gate's own on an answer: a web page's script may read them under serving.cors
# (predict_first.with_cors); a header added to answers here belongs in this list too.
ANSWER_HEADERS = ["x-request-id", "x-maas-model", "x-maas-ignored-columns", "x-maas-unknown-categories",
                  "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy",
                  "retry-after"]


def rate_limit_headers(tier: str, per_minute: int, taken) -> dict[str, str]:
    """The key's request budget on every /predict answer: x-ratelimit-* as OpenAI and GitHub send
    them, and the IETF draft's RateLimit-Policy / RateLimit. Reset: seconds until the bucket is full."""
    remaining = int(taken.remaining)
    reset = max(0, math.ceil((per_minute - taken.remaining) * 60 / per_minute))
    return {"x-ratelimit-limit": str(per_minute), "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(reset), "ratelimit-policy": f'"{tier}";q={per_minute};w=60',
            "ratelimit": f'"{tier}";r={remaining};t={reset}'}


async def refuse(receive, request: dict[str, str], send, status: int, payload: dict,
                 headers: dict[str, str] | None = None) -> None:
    """A refusal before the body is read: the body is read and dropped first, so that a client that
    sends all of it before reading (urllib, requests) gets this answer, not a closed connection."""
    await unread_body_dropped(receive, request)
    await reply(send, status, payload, headers)


async def reply(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    await send_json(send, status, orjson.dumps(payload), headers)


async def send_json(send, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})
