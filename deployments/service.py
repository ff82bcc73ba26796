"""The prediction service: a registered model bundle behind BentoML, with validation, API keys,
tiers (rate limit + monthly row quota), usage metering and a prediction log.

It loads the bundle's own runtime (ONNX Runtime + JSON preprocessing): no training code, no
unpickling, and adaptive batching stays on (BentoML's MLflow pyfunc import would lose it).

Started by `maas serve`, which packages the model and sets:
  MAAS_BUNDLE_DIR      the model bundle (a BentoML model store folder)
  MAAS_SERVING_CONFIG  the serving section of the config, as JSON
  MAAS_MODEL_LABEL     name/version@alias, reported by /metadata and written to the prediction log
  MAAS_TIER_MODELS     {tier: {bundle_dir, label}} for tiers served from another version (serving.tiers.*.model)

A tier's own model gets its own batchable API (its own adaptive-batching queue) on an internal
route; the middleware sends that tier's /predict requests there and refuses the route from outside.
"""

from __future__ import annotations

import json
import operator
import os
import queue
import random
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any

import bentoml
import numpy as np
import orjson  # request bodies and the prediction log: ~4x faster than json, on the hot path
from pydantic import BaseModel, ConfigDict, Field, create_model

from maas.bundle import ModelBundle, transform_arrays
from maas.config import ServingConfig
from maas.service_store import active_keys, connect, current_month, hash_key, log_predictions, record_usage, rows_used

PREDICT_PATH = "/predict"
METADATA_PATH = "/metadata"
ANONYMOUS = "anonymous"


def load_settings() -> tuple[ModelBundle, ServingConfig, str]:
    """The bundle from MAAS_BUNDLE_DIR (maas serve) or a BentoML model (MAAS_BENTO_MODEL, or a Bento's own)."""
    bundle_dir, label = os.environ.get("MAAS_BUNDLE_DIR"), os.environ.get("MAAS_MODEL_LABEL")
    # A Bento records the model it was built with as a Bento argument (see tasks/package.py).
    bento_model = os.environ.get("MAAS_BENTO_MODEL") or getattr(bentoml.use_arguments(), "maas_model", None)
    if not bundle_dir and bento_model:
        model = bentoml.models.get(bento_model)
        bundle_dir = model.path
        label = label or f"{model.info.labels.get('mlflow_model')}/{model.info.labels.get('mlflow_version')}" + (
            f"@{model.info.labels['alias']}" if model.info.labels.get("alias") else "")
    if not bundle_dir:
        raise RuntimeError("set MAAS_BUNDLE_DIR or MAAS_BENTO_MODEL: start the service with `maas serve`")
    config = ServingConfig.model_validate_json(os.environ.get("MAAS_SERVING_CONFIG") or "{}")
    return ModelBundle.load(bundle_dir), config, label or "unknown"


BUNDLE, SETTINGS, MODEL_LABEL = load_settings()


def load_tier_models(default: ModelBundle) -> dict[str, tuple[ModelBundle, str]]:
    """tier -> (bundle, label) for the tiers that `maas serve` packaged another version for."""
    tiers = {}
    for tier, entry in json.loads(os.environ.get("MAAS_TIER_MODELS") or "{}").items():
        bundle = ModelBundle.load(entry["bundle_dir"])
        if bundle.metadata["input_schema"] != default.metadata["input_schema"] or bundle.labels != default.labels:
            raise RuntimeError(f"tier '{tier}': model {entry['label']} takes other columns or predicts other labels "
                               f"than {MODEL_LABEL}; a service's tiers must share one input schema")
        tiers[tier] = (bundle, entry["label"])
    return tiers


def tier_route(tier: str) -> str:
    return f"{PREDICT_PATH}_{re.sub(r'[^A-Za-z0-9_]', '_', tier)}"


TIER_MODELS = load_tier_models(BUNDLE)
TIER_ROUTES = {tier: tier_route(tier) for tier in TIER_MODELS}


def row_model(schema: list[dict[str, str]]) -> type[BaseModel]:
    """A pydantic model of one raw row, from the bundle's input schema: every training column is
    required, no other is allowed, numbers must be finite. Errors then name the row and column."""
    fields: dict[str, Any] = {}
    for index, column in enumerate(schema):
        kind = float if column["type"] == "number" else str
        constraint = Field(..., alias=column["name"], allow_inf_nan=False) if kind is float else Field(..., alias=column["name"])
        fields[f"c{index}"] = (kind, constraint)
    return create_model("Row", __config__=ConfigDict(extra="forbid", populate_by_name=False), **fields)


Row = row_model(BUNDLE.metadata["input_schema"])
FIELD_OF = {column["name"]: f"c{index}" for index, column in enumerate(BUNDLE.metadata["input_schema"])}
NUMERIC_FIELDS = [FIELD_OF[column["name"]] for column in BUNDLE.preprocessing["numeric"]]
CATEGORICAL_FIELDS = [FIELD_OF[column["name"]] for column in BUNDLE.preprocessing["categorical"]]
NUMERIC_VALUES = operator.attrgetter(*NUMERIC_FIELDS) if NUMERIC_FIELDS else None


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


# --- metering, limits and the prediction log (ASGI middleware: before BentoML parses anything) ----


class Meter:
    """Usage and prediction-log writes, queued and flushed by one background thread."""

    def __init__(self, sample: float, flush_every_s: float = 1.0):
        self.sample, self.flush_every_s = sample, flush_every_s
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.connection = connect()
        self.month = current_month()
        self.rows_this_month = rows_used(self.connection, self.month)
        self.keys = active_keys(self.connection)
        self.lock = threading.Lock()
        self.resources = ProcessGauges()
        threading.Thread(target=self._run, name="maas-meter", daemon=True).start()

    def record(self, key_id: str, rows: int, status: int, request_id: str, inputs: list, response: bytes,
               model_label: str = MODEL_LABEL) -> None:
        with self.lock:
            self.rows_this_month[key_id] = self.rows_this_month.get(key_id, 0) + rows
        logged = status < 400 and random.random() < self.sample
        self.pending.put((key_id, rows, status, request_id, inputs if logged else None, response if logged else None,
                          model_label))

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_every_s)
            self.flush()

    def flush(self) -> None:
        counts: dict[str, list[int]] = {}
        entries = []
        now = time.time()
        while True:
            try:
                key_id, rows, status, request_id, inputs, response, model_label = self.pending.get_nowait()
            except queue.Empty:
                break
            total = counts.setdefault(key_id, [0, 0, 0])
            total[0] += 1
            total[1] += rows if status < 400 else 0
            total[2] += status >= 400
            if inputs is not None:
                entries.append((request_id, now, key_id, model_label, status, orjson.dumps(inputs).decode(),
                                response.decode()))
        if counts:
            record_usage(self.connection, current_month(now), {k: tuple(v) for k, v in counts.items()})
        if entries:
            log_predictions(self.connection, entries)
        self.keys = active_keys(self.connection)  # revocations take effect within a flush interval
        self.resources.update()
        month = current_month(now)
        if month != self.month:
            with self.lock:
                self.month, self.rows_this_month = month, {}


class ProcessGauges:
    """CPU and memory of the serving process on /metrics, which BentoML's own metrics lack."""

    def __init__(self):
        import psutil
        from prometheus_client import Gauge

        self.process = psutil.Process()
        self.process.cpu_percent()  # the first call starts the measuring interval
        self.cpu = Gauge("maas_process_cpu_percent", "CPU use of the serving process (100 = one core)",
                         multiprocess_mode="liveall")
        self.memory = Gauge("maas_process_resident_memory_bytes", "resident memory of the serving process",
                            multiprocess_mode="liveall")

    def update(self) -> None:
        self.cpu.set(self.process.cpu_percent())
        self.memory.set(self.process.memory_info().rss)


class TokenBucket:
    """requests_per_minute per key, refilled continuously."""

    def __init__(self):
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, key_id: str, per_minute: int) -> float:
        """0 if allowed, else the seconds until a request would be."""
        now = time.monotonic()
        tokens, last = self.state.get(key_id, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60)
        if tokens < 1:
            self.state[key_id] = (tokens, now)
            return (1 - tokens) * 60 / per_minute
        self.state[key_id] = (tokens - 1, now)
        return 0.0


def seconds_to_next_month() -> int:
    now = datetime.now(timezone.utc)
    start = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int((start - now).total_seconds()) + 1


class ServiceGate:
    """API key, tier rate limit and quota, request size, metering and the prediction log, in front
    of /predict. Everything else (docs, health, metrics, metadata) passes through."""

    def __init__(self, app, settings: ServingConfig | None = None):
        self.app, self.settings = app, settings or SETTINGS
        self.meter = Meter(self.settings.prediction_log_sample)
        self.buckets = TokenBucket()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == METADATA_PATH and scope["method"] == "GET":
            return await reply(send, 200, service_metadata(self.settings))
        if scope["type"] == "http" and scope["path"].startswith(PREDICT_PATH + "_"):
            return await reply(send, 404, {"error": f"{scope['path']}: not found; send requests to {PREDICT_PATH}"})
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        key_id, tier, tier_name = ANONYMOUS, None, None
        if self.settings.auth:
            presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            found = self.meter.keys.get(hash_key(presented)) if presented else None
            if found is None:
                return await reply(send, 401, {"error": "missing or invalid API key (header X-API-Key)"})
            key_id, tier_name = found
            tier = self.settings.tiers.get(tier_name)
            if tier is None:
                return await reply(send, 403, {"error": f"key {key_id} has tier '{tier_name}', which this service does not offer"})
            wait = self.buckets.take(key_id, tier.requests_per_minute)
            if wait:
                self.meter.record(key_id, 0, 429, "", [], b"")
                return await reply(send, 429, {"error": f"rate limit of tier '{tier_name}': "
                                               f"{tier.requests_per_minute} requests per minute"},
                                   {"retry-after": str(max(1, round(wait)))})
        declared = int(headers.get("content-length") or 0)
        if declared > self.settings.max_request_bytes:
            return await reply(send, 413, {"error": f"request body of {declared} bytes exceeds "
                                           f"{self.settings.max_request_bytes}"})
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.settings.max_request_bytes:
                return await reply(send, 413, {"error": f"request body exceeds {self.settings.max_request_bytes} bytes"})
            if not message.get("more_body"):
                break
        request_rows = parsed_rows(bytes(body))
        rows = len(request_rows)
        if rows > self.settings.max_rows_per_request:
            return await reply(send, 413, {"error": f"{rows} rows in one request; the limit is "
                                           f"{self.settings.max_rows_per_request}"})
        if tier is not None and self.meter.rows_this_month.get(key_id, 0) + rows > tier.monthly_rows:
            self.meter.record(key_id, 0, 429, "", [], b"")
            return await reply(send, 429, {"error": f"monthly quota of tier '{tier_name}' "
                                           f"({tier.monthly_rows} rows) used up"},
                               {"retry-after": str(seconds_to_next_month())})
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        status, chunks = 500, []
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        route = TIER_ROUTES.get(tier_name)  # this tier's own model, if it has one
        await self.app({**scope, "path": route, "raw_path": route.encode()} if route else scope, replay, capture)
        self.meter.record(key_id, rows, status, request_id, request_rows, b"".join(chunks),
                          TIER_MODELS[tier_name][1] if route else MODEL_LABEL)


def service_metadata(settings: ServingConfig) -> dict:
    """GET /metadata: the model behind this service, its test metrics and input schema."""
    meta = BUNDLE.metadata
    return {"model": MODEL_LABEL, "variant": meta.get("variant"), "labels": meta["labels"],
            "test_metrics": meta.get("metrics", {}), "input_schema": meta["input_schema"],
            "auth": settings.auth, "max_rows_per_request": settings.max_rows_per_request,
            "tiers": {name: {**tier.model_dump(), "served_by": TIER_MODELS[name][1] if name in TIER_MODELS else MODEL_LABEL}
                      for name, tier in settings.tiers.items()}}


def parsed_rows(body: bytes) -> list:
    """The request's rows, parsed once here for the quota and the prediction log (BentoML parses
    again to validate); [] when the body is not a JSON object with a list of rows."""
    try:
        rows = orjson.loads(body).get("rows")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return rows if isinstance(rows, list) else []


async def reply(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(payload).encode()
    extra = [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})


# --- the service -----------------------------------------------------------------------------------


def predict_rows(bundle: ModelBundle, rows: list) -> list[dict]:
    """Label and class probabilities per validated row, the features built straight from the rows."""
    numeric = (np.array([NUMERIC_VALUES(row) for row in rows], dtype=np.float64).reshape(len(rows), -1)
               if NUMERIC_FIELDS else None)
    categorical = [np.array([getattr(row, name) for row in rows], dtype=object) for name in CATEGORICAL_FIELDS]
    probabilities = bundle.predict_features(transform_arrays(numeric, categorical, len(rows), bundle.preprocessing))
    labels = bundle.labels
    return [{"label": labels[int(np.argmax(p))], "probabilities": dict(zip(labels, p.tolist()))} for p in probabilities]


def batched_api(route: str, bundle: ModelBundle):
    """A batchable prediction API for one bundle (one adaptive-batching queue per model)."""

    def predict(self, rows: Annotated[list[Row], Field(min_length=1)]) -> list[Prediction]:  # type: ignore[valid-type]
        """Label and class probabilities for each raw row (columns as in the training data)."""
        return predict_rows(bundle, rows)

    predict.__name__ = route.strip("/")
    return bentoml.api(route=route, batchable=True, max_batch_size=SETTINGS.max_batch_size,
                       max_latency_ms=SETTINGS.max_latency_ms)(predict)


class MaasService:
    predict = batched_api(PREDICT_PATH, BUNDLE)


for _tier, (_bundle, _) in TIER_MODELS.items():
    setattr(MaasService, TIER_ROUTES[_tier].strip("/"), batched_api(TIER_ROUTES[_tier], _bundle))

MaasService = bentoml.service(name="maas", workers=1, traffic={"timeout": 30, "max_concurrency": 256})(MaasService)
MaasService.add_asgi_middleware(ServiceGate)
