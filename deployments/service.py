"""The BentoML service: a registered model bundle behind the service gate (deployments/gate.py), with
validation, API keys, tiers (rate limit + monthly row quota), usage metering and a prediction log.

It loads the bundle's own runtime (ONNX Runtime + JSON preprocessing): no training code, no
unpickling.

Started by `maas serve`, which packages the model and sets:
  MAAS_BUNDLE_DIR      the model bundle (a BentoML model store folder)
  MAAS_SERVING_CONFIG  the serving section of the config, as JSON
  MAAS_MODEL_LABEL     name/version@alias, reported by /metadata and written to the prediction log
  MAAS_TIER_MODELS     {tier: {bundle_dir, label}} for tiers served from another version (serving.tiers.*.model)
  MAAS_SERVED_MODELS_FILE  the same, kept current as the aliases move (deployments/follower.py)

A Bento built by training (`bentoml serve <bento tag>`) carries the same as Bento arguments:
`maas_model` (the BentoML model tag), `maas_serving` (the training run's serving section, JSON) and
`maas_tier_models` ({tier: BentoML model tag}); the environment variables above override them.

What BentoML needs before a worker starts is read at import from those small files: the worker
count, logging and tracing settings, and the API's row type (from the bundle's preprocessing; the
OpenAPI document and /docs show it). The models load in the service's constructor, in each worker.
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import BaseModel, Field

from deployments.batcher import model_answers
from deployments.bentoml_fixes import cancel_bentoml_timeout_timers, freeze_startup_objects
from deployments.connections import spread_connections_over_workers
from deployments.follower import SERVED_MODELS_ENV, ServedModelsWatcher, parse_served_models
from deployments.gate import PREDICT_PATH, ServiceGate, load_models
from deployments.predict_first import PredictFirst, with_cors
from deployments.request_reader import row_model
from maas.bundle import PREPROCESSING_FILE
from maas.config import ServingConfig
from maas.processes import die_with_parent

BENTO_ARGUMENTS = bentoml.use_arguments()


def bento_model_label(model) -> str:
    """name/version@alias of a BentoML model packaged by tasks/package.py, from its labels."""
    labels = model.info.labels
    return f"{labels.get('mlflow_model')}/{labels.get('mlflow_version')}" + (
        f"@{labels['alias']}" if labels.get("alias") else "")


@dataclass(frozen=True)
class ServiceSource:
    """Where this service's models and settings come from: `maas serve`'s environment, else the Bento's
    arguments. Finding them reads a few small files; loading the models is the constructor's job."""

    bundle_dir: str
    label: str
    settings: ServingConfig
    tiers: dict[str, tuple[str, str]]  # tier -> (bundle folder, label)

    @classmethod
    def find(cls) -> ServiceSource:
        bundle_dir, label = os.environ.get("MAAS_BUNDLE_DIR"), os.environ.get("MAAS_MODEL_LABEL")
        bento_model = os.environ.get("MAAS_BENTO_MODEL") or getattr(BENTO_ARGUMENTS, "maas_model", None)
        if not bundle_dir and bento_model:
            model = bentoml.models.get(bento_model)
            bundle_dir, label = model.path, label or bento_model_label(model)
        if not bundle_dir:
            raise RuntimeError("set MAAS_BUNDLE_DIR or MAAS_BENTO_MODEL: start the service with `maas serve`")
        settings = ServingConfig.model_validate_json(
            os.environ.get("MAAS_SERVING_CONFIG") or getattr(BENTO_ARGUMENTS, "maas_serving", None) or "{}")
        return cls(str(bundle_dir), label or "unknown", settings, cls.tier_sources())

    @staticmethod
    def tier_sources() -> dict[str, tuple[str, str]]:
        from_serve = os.environ.get("MAAS_TIER_MODELS")
        if from_serve is not None:
            return {tier: (entry["bundle_dir"], entry["label"]) for tier, entry in json.loads(from_serve).items()}
        sources = {}
        for tier, tag in json.loads(getattr(BENTO_ARGUMENTS, "maas_tier_models", None) or "{}").items():
            model = bentoml.models.get(tag)
            sources[tier] = (model.path, bento_model_label(model))
        return sources

    def preprocessing(self) -> dict:
        return json.loads((Path(self.bundle_dir) / PREPROCESSING_FILE).read_text())


SOURCE = ServiceSource.find()
Row = row_model(SOURCE.preprocessing(), SOURCE.settings.strict_columns)


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class MaasService:
    def __init__(self):
        # A worker must not outlive BentoML's arbiter: an orphan kept answering on the port with the
        # old model after `maas serve` was killed. Its requests are metered before they are answered.
        die_with_parent(os.getppid(), signal.SIGKILL)
        settings = SOURCE.settings
        followed = os.environ.get(SERVED_MODELS_ENV)  # set by `maas serve`: where the aliases point now
        if followed:  # a worker (re)started after an alias moved starts on the new version
            loaded = Path(followed).read_bytes()
            default, tiers = parse_served_models(loaded)
        else:
            default, tiers = (SOURCE.bundle_dir, SOURCE.label), SOURCE.tiers
        self.gate = ServiceGate(None, load_models(default, tiers, settings.model_threads), settings)
        if followed:
            ServedModelsWatcher(Path(followed), self.gate, settings.model_threads, loaded)
        freeze_startup_objects()

    @bentoml.api(route=PREDICT_PATH)
    def predict(self, rows: Annotated[list[Row], Field(min_length=1)]) -> list[Prediction]:  # type: ignore[valid-type]
        """Label and class probabilities for each raw row (columns as in the training data)."""
        # Over HTTP the gate answers first; this serves in-process callers and declares the contract.
        bundle = self.gate.models.default.bundle
        columns = self.gate.reader.validated_columns([row.model_dump(by_alias=True) for row in rows])
        return model_answers(bundle, columns)


class GateMiddleware:
    """Puts the service instance's gate in front of BentoML's routes. BentoML builds middleware
    before it makes the instance, so the gate is found per request; until then, requests pass."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        gate = current_gate() if scope["type"] == "http" else None
        if gate is None:
            return await self.app(scope, receive, send)
        return await gate.handle(scope, receive, send, self.app)


# Looked up once: `bentoml.get_current_service` is a lazy attribute of the package, which imports its
# module on every access (4% of a worker's event-loop CPU at one text per request, concurrency 32).
get_current_service = bentoml.get_current_service


def current_gate() -> ServiceGate | None:
    """The gate of this worker's service instance, or None before BentoML has made it."""
    service = get_current_service()
    return service.gate if service is not None else None


cancel_bentoml_timeout_timers()
MaasService = bentoml.service(
    name="maas", workers=SOURCE.settings.workers or "cpu_count",
    traffic={"timeout": 30, "max_concurrency": 256},
    # BentoML's tracing records every span even when none is exported: opt in (serving.trace_predictions).
    tracing={"excluded_urls": [] if SOURCE.settings.trace_predictions else [PREDICT_PATH]},
    logging={"access": {"enabled": SOURCE.settings.access_log}},
    # serving.tls: uvicorn terminates TLS in each worker, for `maas serve` and a Bento alike
    ssl={"enabled": True, "certfile": SOURCE.settings.tls.certfile, "keyfile": SOURCE.settings.tls.keyfile}
    if SOURCE.settings.tls.enabled else {},
)(MaasService)
MaasService.add_asgi_middleware(GateMiddleware)
spread_connections_over_workers(MaasService)


class PredictFirstService(type(MaasService)):
    """BentoML's service whose ASGI app answers /predict ahead of BentoML's middleware stack
    (deployments/predict_first.py), with the timeout and per-worker concurrency limit BentoML's
    app factory derived from `traffic` (and any BentoML configuration over it); browsers'
    cross-origin calls answered in front of both (serving.cors)."""

    __slots__ = ()

    def to_asgi(self, is_main: bool = True):
        from _bentoml_impl.server.app import ServiceAppFactory

        self.inject_config()  # what BentoML's Service.to_asgi does, keeping the factory to read its limits
        factory = ServiceAppFactory(self, is_main=is_main)
        return with_cors(PredictFirst(factory(), current_gate, factory.timeout, factory.max_concurrency or math.inf,
                                      self.name), SOURCE.settings.cors)


MaasService.__class__ = PredictFirstService
