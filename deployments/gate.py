"""The service's ASGI gate: POST /predict (API key, tier rate limit and quota, request size,
validation, adaptive batching, the model, metering and the prediction log) and GET /metadata.
Everything else (docs, health, metrics) passes through to BentoML.

It sits in front of BentoML's routes but inside its metrics, timeout and concurrency limit.
BentoML's own API path cost ~3 ms of CPU per request here (a no-op BentoML API peaked at ~340
requests/s on 2 cores, an answer from the gate at ~900), more than the model itself. Nothing here
needs a running server: tests drive it in-process as an ASGI app.
"""

from __future__ import annotations

import uuid
from urllib.parse import quote
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

from deployments.batcher import Batcher
from deployments.limits import open_limits
from deployments.metering import Meter, ProcessGauges
from deployments.request_reader import BadRequest, RequestReader, read_body
from maas.bundle import ModelBundle
from maas.config import ServingConfig
from maas.paths import maas_home
from maas.service_store import connect, current_month, hash_key, rows_used

PREDICT_PATH = "/predict"
METADATA_PATH = "/metadata"
ANONYMOUS = "anonymous"


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


def predictions(bundle: ModelBundle, probabilities: np.ndarray) -> list[dict]:
    labels = bundle.labels
    return [{"label": labels[winner], "probabilities": dict(zip(labels, row))}
            for winner, row in zip(probabilities.argmax(1).tolist(), probabilities.tolist())]


def seconds_to_next_month() -> int:
    now = datetime.now(timezone.utc)
    start = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int((start - now).total_seconds()) + 1


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
        self.meter = Meter(settings.prediction_log_sample, gauges=ProcessGauges(registry))
        rows_connection = connect()  # the meter's belongs to its thread
        self.limits = open_limits(settings, maas_home() / "run",
                                  lambda key_id, month: rows_used(rows_connection, month).get(key_id, 0))
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
        if scope["type"] == "http" and scope["path"] == METADATA_PATH and scope["method"] == "GET":
            return await reply(send, 200, self.metadata())
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            return await passthrough(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        key_id, tier, tier_name = ANONYMOUS, None, None
        answering = self.answering  # one set of models for the whole request, even across a swap
        default_label = answering.models.default.label
        if self.settings.auth:
            presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            found = self.meter.keys.get(hash_key(presented)) if presented else None
            if found is None:
                return await reply(send, 401, {"error": "missing or invalid API key (header X-API-Key)"})
            key_id, tier_name = found
            tier = self.settings.tiers.get(tier_name)
            if tier is None:
                return await reply(send, 403, {"error": f"key {key_id} has tier '{tier_name}', which this service does not offer"})
            wait = self.limits.take(key_id, tier.requests_per_minute)
            if wait:
                self.meter.record(key_id, 0, 429, default_label)
                return await reply(send, 429, {"error": f"rate limit of tier '{tier_name}': "
                                               f"{tier.requests_per_minute} requests per minute"},
                                   {"retry-after": str(max(1, round(wait)))})
        try:
            body = await read_body(receive, headers, self.settings.max_request_bytes)
            logged, columns, ignored = answering.reader.read(body, self.settings.max_rows_per_request)
        except BadRequest as refused:
            self.meter.record(key_id, 0, refused.status, default_label)
            return await reply(send, refused.status, {"error": refused.message, **({"detail": refused.detail} if refused.detail else {})})
        if tier is not None and not self.limits.reserve_rows(key_id, columns.n_rows, tier.monthly_rows, current_month()):
            self.meter.record(key_id, 0, 429, default_label)
            return await reply(send, 429, {"error": f"monthly quota of tier '{tier_name}' "
                                           f"({tier.monthly_rows} rows) used up"},
                               {"retry-after": str(seconds_to_next_month())})
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        model = answering.models.for_tier(tier_name)
        probabilities = await answering.batcher(tier_name).probabilities(columns)
        answer = orjson.dumps(predictions(model.bundle, probabilities))
        extra = {"x-maas-ignored-columns": ignored_columns_header(ignored)} if ignored else {}
        self.meter.record(key_id, columns.n_rows, 200, model.label, request_id, logged, answer)  # metered, then answered
        self.answered.labels(model.label).inc()
        await send_json(send, 200, answer, {"x-request-id": request_id, "x-maas-model": model.label, **extra})

    def metadata(self) -> dict:
        """GET /metadata: the model behind this service, its test metrics and input schema."""
        default, settings = self.models.default, self.settings
        meta = default.bundle.metadata
        return {"model": default.label, "variant": meta.get("variant"), "labels": meta["labels"],
                "test_metrics": meta.get("metrics", {}), "input_schema": meta["input_schema"],
                # columns of the training file the model does not read; any other unknown column is ignored too
                "ignored_columns": meta.get("dropped_columns", {}), "strict_columns": settings.strict_columns,
                "missing_values": "null is a missing value, imputed as in training",
                # text columns: the encoder, and the token count past which a text is truncated
                **({"text_columns": meta["text"]} if meta.get("text") else {}),
                "auth": settings.auth, "max_rows_per_request": settings.max_rows_per_request,
                "tiers": {name: {**tier.model_dump(), "served_by": self.models.for_tier(name).label}
                          for name, tier in settings.tiers.items()}}


def ignored_columns_header(columns: list[str]) -> str:
    """Column names, comma-separated; a space, comma, '%' or anything outside printable ASCII is
    percent-encoded, since a header is latin-1, may not start or end with a space (h11 closed the
    connection on a column named ' '), and a column name may be any text."""
    return ", ".join(quote(column, safe="!\"#$&'()*+-./:;<=>?@[\\]^_`{|}~") for column in columns)


async def reply(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    await send_json(send, status, orjson.dumps(payload), headers)


async def send_json(send, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})
