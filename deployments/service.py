"""The prediction service: a registered model bundle behind BentoML, with validation, API keys,
tiers (rate limit + monthly row quota), usage metering and a prediction log.

It loads the bundle's own runtime (ONNX Runtime + JSON preprocessing): no training code, no
unpickling.

Started by `maas serve`, which packages the model and sets:
  MAAS_BUNDLE_DIR      the model bundle (a BentoML model store folder)
  MAAS_SERVING_CONFIG  the serving section of the config, as JSON
  MAAS_MODEL_LABEL     name/version@alias, reported by /metadata and written to the prediction log
  MAAS_TIER_MODELS     {tier: {bundle_dir, label}} for tiers served from another version (serving.tiers.*.model)

A Bento built by training (`bentoml serve <bento tag>`) carries the same three as Bento arguments:
`maas_model` (the BentoML model tag), `maas_serving` (the training run's serving section, JSON) and
`maas_tier_models` ({tier: BentoML model tag}); the environment variables above override them.

POST /predict is answered by the ASGI gate in front of BentoML's routes: key, tier limits, size,
validation, adaptive batching and the model, with BentoML's metrics, tracing, timeout and
concurrency limit still around it. BentoML's own API path cost ~3 ms of CPU per request here
(a no-op BentoML API peaked at ~340 requests/s on 2 cores, an answer from the gate at ~900), more
than the model itself. The declared BentoML API keeps the same contract for the OpenAPI schema,
the docs page and BentoML's clients.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import operator
import os
import queue
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Annotated, Any, NamedTuple

import bentoml
import numpy as np
import orjson  # request bodies, answers and the prediction log: ~4x faster than json, on the hot path
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from deployments.bentoml_fixes import cancel_bentoml_timeout_timers, freeze_startup_objects
from deployments.limits import SharedLimits, limits_file
from maas.bundle import ModelBundle, transform_arrays
from maas.config import ServingConfig
from maas.paths import maas_home
from maas.service_store import active_keys, connect, current_month, hash_key, log_predictions, record_usage, rows_used

PREDICT_PATH = "/predict"
METADATA_PATH = "/metadata"
ANONYMOUS = "anonymous"


def bento_model_label(model) -> str:
    """name/version@alias of a BentoML model packaged by tasks/package.py, from its labels."""
    labels = model.info.labels
    return f"{labels.get('mlflow_model')}/{labels.get('mlflow_version')}" + (
        f"@{labels['alias']}" if labels.get("alias") else "")


def load_settings() -> tuple[ModelBundle, ServingConfig, str]:
    """The bundle from MAAS_BUNDLE_DIR (maas serve) or a BentoML model (MAAS_BENTO_MODEL, or a Bento's own);
    the serving config from MAAS_SERVING_CONFIG, else the one the Bento was built with, else the defaults."""
    bundle_dir, label = os.environ.get("MAAS_BUNDLE_DIR"), os.environ.get("MAAS_MODEL_LABEL")
    # A Bento records its model and the training run's serving config as Bento arguments (tasks/package.py).
    bento_model = os.environ.get("MAAS_BENTO_MODEL") or getattr(BENTO_ARGUMENTS, "maas_model", None)
    if not bundle_dir and bento_model:
        model = bentoml.models.get(bento_model)
        bundle_dir, label = model.path, label or bento_model_label(model)
    if not bundle_dir:
        raise RuntimeError("set MAAS_BUNDLE_DIR or MAAS_BENTO_MODEL: start the service with `maas serve`")
    config = ServingConfig.model_validate_json(
        os.environ.get("MAAS_SERVING_CONFIG") or getattr(BENTO_ARGUMENTS, "maas_serving", None) or "{}")
    return ModelBundle.load(bundle_dir, config.model_threads or None), config, label or "unknown"


BENTO_ARGUMENTS = bentoml.use_arguments()
BUNDLE, SETTINGS, MODEL_LABEL = load_settings()


def tier_model_sources() -> dict[str, tuple[str, str]]:
    """tier -> (bundle dir, label): from `maas serve` (MAAS_TIER_MODELS), else the Bento's own models."""
    from_serve = os.environ.get("MAAS_TIER_MODELS")
    if from_serve is not None:
        return {tier: (entry["bundle_dir"], entry["label"]) for tier, entry in json.loads(from_serve).items()}
    sources = {}
    for tier, tag in json.loads(getattr(BENTO_ARGUMENTS, "maas_tier_models", None) or "{}").items():
        model = bentoml.models.get(tag)
        sources[tier] = (model.path, bento_model_label(model))
    return sources


def load_tier_models(default: ModelBundle) -> dict[str, tuple[ModelBundle, str]]:
    """tier -> (bundle, label) for the tiers served from another version (serving.tiers.*.model)."""
    tiers = {}
    for tier, (bundle_dir, label) in tier_model_sources().items():
        bundle = ModelBundle.load(bundle_dir, SETTINGS.model_threads or None)
        if bundle.metadata["input_schema"] != default.metadata["input_schema"] or bundle.labels != default.labels:
            raise RuntimeError(f"tier '{tier}': model {label} takes other columns or predicts other labels "
                               f"than {MODEL_LABEL}; a service's tiers must share one input schema")
        tiers[tier] = (bundle, label)
    return tiers


TIER_MODELS = load_tier_models(BUNDLE)


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
INPUT_COLUMNS = frozenset(column["name"] for column in BUNDLE.metadata["input_schema"])
NUMERIC_COLUMNS = [column["name"] for column in BUNDLE.preprocessing["numeric"]]
CATEGORICAL_COLUMNS = [column["name"] for column in BUNDLE.preprocessing["categorical"]]


def tuple_getter(names: list[str]):
    """row -> tuple of its values for these columns (operator.itemgetter, always a tuple)."""
    if len(names) == 1:
        return lambda row: (row[names[0]],)
    return operator.itemgetter(*names) if names else None


NUMERIC_OF, CATEGORICAL_OF = tuple_getter(NUMERIC_COLUMNS), tuple_getter(CATEGORICAL_COLUMNS)


class PredictRequest(BaseModel):
    """The body of POST /predict."""

    rows: Annotated[list[Row], Field(min_length=1)]  # type: ignore[valid-type]


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class Columns(NamedTuple):
    """A request's rows as arrays in the bundle's column order, ready for its preprocessing."""

    numeric: np.ndarray | None
    categorical: list[np.ndarray]
    n_rows: int


class BadRequest(Exception):
    """A request the service refuses: the status and a message naming the row and field."""

    def __init__(self, status: int, message: str, detail: list | None = None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


def exact_columns(rows: Any) -> Columns | None:
    """Columns straight from parsed JSON when every row has exactly the training columns, finite
    numbers and text where expected; None otherwise, and pydantic then gives the verdict and names
    the field. ~2 us per row against pydantic's ~10."""
    if type(rows) is not list or not rows:
        return None
    try:
        numeric_values = list(map(NUMERIC_OF, rows)) if NUMERIC_COLUMNS else None
        categorical_values = list(map(CATEGORICAL_OF, rows)) if CATEGORICAL_COLUMNS else None
    except (KeyError, TypeError, IndexError):
        return None  # a row that is not an object, or lacks a column
    if set(map(len, rows)) != {len(INPUT_COLUMNS)}:
        return None  # every column is there, so a longer row has an unknown one
    numeric = None
    if numeric_values is not None:
        try:
            numeric = np.array(list(itertools.chain.from_iterable(numeric_values)))
        except (ValueError, TypeError, OverflowError):
            return None
        if numeric.dtype.kind not in "fi":
            return None  # text ("1.5") or null among the numbers: pydantic reads them, the log keeps its numbers
        numeric = numeric.astype(np.float64, copy=False)
        if not np.isfinite(numeric).all():
            return None
        numeric = numeric.reshape(len(rows), len(NUMERIC_COLUMNS))
    categorical = []
    if categorical_values is not None:
        for values in zip(*categorical_values):
            if any(type(value) is not str for value in values):
                return None
            categorical.append(np.array(values, dtype=object))
    return Columns(numeric, categorical, len(rows))


def read_rows(body: bytes, max_rows: int) -> tuple[bytes, Columns]:
    """The request as the prediction log keeps it ({"rows": [...]}) and its columns; BadRequest
    (400/413) names what is wrong. A request that passes the exact check is logged as received."""
    try:
        rows = orjson.loads(body).get("rows")
    except (orjson.JSONDecodeError, AttributeError):
        rows = None
    if isinstance(rows, list):
        refuse_too_many(rows, max_rows)
    columns = exact_columns(rows)
    if columns is not None:
        return body, columns
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as error:
        raise bad_rows(error) from None
    rows = [row.model_dump(by_alias=True) for row in request.rows]
    refuse_too_many(rows, max_rows)  # a body orjson could not read (e.g. a 100-digit integer) is counted here
    columns = exact_columns(rows)
    if columns is None:  # pydantic accepted what the exact check cannot read: say so, never 5xx
        raise BadRequest(400, "rows could not be read as the training columns")
    return orjson.dumps({"rows": rows}), columns  # as validated: "1.5" logged as 1.5


def refuse_too_many(rows: list, max_rows: int) -> None:
    if len(rows) > max_rows:
        raise BadRequest(413, f"{len(rows)} rows in one request; the limit is {max_rows}")


def bad_rows(error: ValidationError) -> BadRequest:
    """400 naming the first problem in one line ("row 2, column 'x': ..."), every problem in detail."""
    detail = [{"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
              for item in error.errors(include_url=False, include_input=False)]
    first = detail[0]
    loc = first["loc"]
    if len(loc) >= 3 and loc[0] == "rows":
        where = f"row {loc[1]}, column '{loc[2]}'"
    else:
        where = ".".join(map(str, loc)) or "body"
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    return BadRequest(400, f"{where}: {first['msg']}{more}", detail)


def predictions(bundle: ModelBundle, probabilities: np.ndarray) -> list[dict]:
    labels = bundle.labels
    return [{"label": labels[winner], "probabilities": dict(zip(labels, row))}
            for winner, row in zip(probabilities.argmax(1).tolist(), probabilities.tolist())]


def model_probabilities(bundle: ModelBundle, columns: Columns) -> np.ndarray:
    return bundle.predict_features(transform_arrays(columns.numeric, columns.categorical, columns.n_rows,
                                                    bundle.preprocessing))


class Batcher:
    """Adaptive batching for one model. A request that finds the model idle runs at once; the
    requests that arrive while it runs go together in the next call, up to `max_batch_size` rows.
    The batch grows with the load and no request waits on a timer: BentoML's latency-bound batcher
    answered 503 when its bound could not be met, and added ~45 ms to a lone 64-row request here."""

    def __init__(self, bundle: ModelBundle, max_batch_rows: int, batch_rows):
        self.bundle, self.max_batch_rows, self.batch_rows = bundle, max_batch_rows, batch_rows
        self.waiting: collections.deque[tuple[Columns, asyncio.Future]] = collections.deque()
        self.worker: asyncio.Task | None = None
        # ONNX Runtime releases the GIL: the event loop reads the next requests while a batch runs.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="maas-model")

    async def probabilities(self, columns: Columns) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((columns, future))
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self.drain())
        return await future

    async def drain(self) -> None:
        try:
            while self.waiting:
                await self.run_batch()
        finally:
            self.worker = None

    async def run_batch(self) -> None:
        batch = [self.waiting.popleft()]
        rows = batch[0][0].n_rows
        while self.waiting and rows + self.waiting[0][0].n_rows <= self.max_batch_rows:
            batch.append(self.waiting.popleft())
            rows += batch[-1][0].n_rows
        merged = batch[0][0] if len(batch) == 1 else Columns(
            np.concatenate([columns.numeric for columns, _ in batch]) if NUMERIC_COLUMNS else None,
            [np.concatenate([columns.categorical[index] for columns, _ in batch])
             for index in range(len(CATEGORICAL_COLUMNS))], rows)
        self.batch_rows.observe(rows)
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self.executor, model_probabilities, self.bundle, merged)
        except Exception as error:  # noqa: BLE001 - each waiting request gets the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        start = 0
        for columns, future in batch:
            if not future.done():  # a request cancelled by BentoML's timeout is skipped
                future.set_result(probabilities[start:start + columns.n_rows])
            start += columns.n_rows


# --- metering, limits and the prediction log (ASGI middleware: before BentoML parses anything) ----


class Meter:
    """Usage and prediction-log writes, queued and flushed by one background thread."""

    def __init__(self, sample: float, flush_every_s: float = 1.0):
        self.sample, self.flush_every_s = sample, flush_every_s
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.connection = connect()
        self.keys = active_keys(self.connection)
        self.resources = ProcessGauges()
        threading.Thread(target=self._run, name="maas-meter", daemon=True).start()

    def record(self, key_id: str, rows: int, status: int, request_id: str, request: bytes, response: bytes,
               model_label: str = MODEL_LABEL) -> None:
        logged = status < 400 and random.random() < self.sample
        self.pending.put((key_id, rows, status, request_id, request if logged else None, response if logged else None,
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
                key_id, rows, status, request_id, request, response, model_label = self.pending.get_nowait()
            except queue.Empty:
                break
            total = counts.setdefault(key_id, [0, 0, 0])
            total[0] += 1
            total[1] += rows if status < 400 else 0
            total[2] += status >= 400
            if request is not None:
                entries.append((request_id, now, key_id, model_label, status, request.decode(),
                                response.decode()))
        if counts:
            record_usage(self.connection, current_month(now), {k: tuple(v) for k, v in counts.items()})
        if entries:
            log_predictions(self.connection, entries)
        self.keys = active_keys(self.connection)  # revocations take effect within a flush interval
        self.resources.update()


class ProcessGauges:
    """CPU and memory of each worker process on /metrics (a series per pid), which BentoML's own
    metrics lack."""

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


def seconds_to_next_month() -> int:
    now = datetime.now(timezone.utc)
    start = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int((start - now).total_seconds()) + 1


class ServiceGate:
    """POST /predict: API key, tier rate limit and quota, request size, validation, adaptive
    batching, the model, metering and the prediction log. GET /metadata too. Everything else
    (docs, health, metrics) passes through to BentoML."""

    def __init__(self, app, settings: ServingConfig | None = None):
        self.app, self.settings = app, settings or SETTINGS
        self.meter = Meter(self.settings.prediction_log_sample)
        rows_connection = connect()  # the meter's belongs to its thread
        self.limits = SharedLimits(limits_file(maas_home() / "run"),
                                   lambda key_id, month: rows_used(rows_connection, month).get(key_id, 0))
        from prometheus_client import Histogram

        batch_rows = Histogram("maas_batch_rows", "rows per model call (adaptive batching)",
                               buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
        self.batchers = {tier: Batcher(bundle, self.settings.max_batch_size, batch_rows)
                         for tier, (bundle, _) in TIER_MODELS.items()}
        self.default_batcher = Batcher(BUNDLE, self.settings.max_batch_size, batch_rows)
        freeze_startup_objects()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == METADATA_PATH and scope["method"] == "GET":
            return await reply(send, 200, service_metadata(self.settings))
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
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
            wait = self.limits.take(key_id, tier.requests_per_minute)
            if wait:
                self.meter.record(key_id, 0, 429, "", b"", b"")
                return await reply(send, 429, {"error": f"rate limit of tier '{tier_name}': "
                                               f"{tier.requests_per_minute} requests per minute"},
                                   {"retry-after": str(max(1, round(wait)))})
        try:
            body = await read_body(receive, headers, self.settings.max_request_bytes)
            logged, columns = read_rows(body, self.settings.max_rows_per_request)
        except BadRequest as refused:
            self.meter.record(key_id, 0, refused.status, "", b"", b"")
            return await reply(send, refused.status, {"error": refused.message, **({"detail": refused.detail} if refused.detail else {})})
        if tier is not None and not self.limits.reserve_rows(key_id, columns.n_rows, tier.monthly_rows, current_month()):
            self.meter.record(key_id, 0, 429, "", b"", b"")
            return await reply(send, 429, {"error": f"monthly quota of tier '{tier_name}' "
                                           f"({tier.monthly_rows} rows) used up"},
                               {"retry-after": str(seconds_to_next_month())})
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        bundle, label = TIER_MODELS.get(tier_name, (BUNDLE, MODEL_LABEL))
        probabilities = await self.batchers.get(tier_name, self.default_batcher).probabilities(columns)
        answer = orjson.dumps(predictions(bundle, probabilities))
        await send_json(send, 200, answer, {"x-request-id": request_id})
        self.meter.record(key_id, columns.n_rows, 200, request_id, logged, answer, label)


async def read_body(receive, headers: dict[str, str], max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be larger than max_bytes
    (BentoML 1.4 has no request-size limit of its own)."""
    declared = headers.get("content-length") or "0"
    if not declared.isdigit():
        raise BadRequest(400, f"Content-Length '{declared[:40]}' is not a number of bytes")
    declared = int(declared)
    if declared > max_bytes:
        raise BadRequest(413, f"request body of {declared} bytes exceeds {max_bytes}")
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > max_bytes:
            raise BadRequest(413, f"request body exceeds {max_bytes} bytes")
        if not message.get("more_body"):
            return bytes(body)


def service_metadata(settings: ServingConfig) -> dict:
    """GET /metadata: the model behind this service, its test metrics and input schema."""
    meta = BUNDLE.metadata
    return {"model": MODEL_LABEL, "variant": meta.get("variant"), "labels": meta["labels"],
            "test_metrics": meta.get("metrics", {}), "input_schema": meta["input_schema"],
            "auth": settings.auth, "max_rows_per_request": settings.max_rows_per_request,
            "tiers": {name: {**tier.model_dump(), "served_by": TIER_MODELS[name][1] if name in TIER_MODELS else MODEL_LABEL}
                      for name, tier in settings.tiers.items()}}


async def reply(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    await send_json(send, status, orjson.dumps(payload), headers)


async def send_json(send, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})


# --- the service -----------------------------------------------------------------------------------


class MaasService:
    @bentoml.api(route=PREDICT_PATH)
    def predict(self, rows: Annotated[list[Row], Field(min_length=1)]) -> list[Prediction]:  # type: ignore[valid-type]
        """Label and class probabilities for each raw row (columns as in the training data)."""
        # Over HTTP the gate answers first; this serves in-process callers and declares the contract.
        columns = exact_columns([row.model_dump(by_alias=True) for row in rows])
        return predictions(BUNDLE, model_probabilities(BUNDLE, columns))


cancel_bentoml_timeout_timers()
MaasService = bentoml.service(
    name="maas", workers=SETTINGS.workers or "cpu_count", traffic={"timeout": 30, "max_concurrency": 256},
    # BentoML's tracing records every span even when none is exported: opt in (serving.trace_predictions).
    tracing={"excluded_urls": [] if SETTINGS.trace_predictions else [PREDICT_PATH]},
    logging={"access": {"enabled": SETTINGS.access_log}},
)(MaasService)
MaasService.add_asgi_middleware(ServiceGate)
