"""Retraining: a new drift or quality incident runs the training deployment; the promotion gate
still decides what the new version becomes. Labelled production rows can join its training data."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from maas import audit
from maas.config import RunConfig
from maas.paths import maas_home
from maas.run_context import RunContext
from maas.service_store import connect
from maas.tables import MODEL_IGNORED
from tasks.alerts import AlertOutcome
from tasks.prediction_log import LoggedRows
from tasks.quality import RollbackDecision
from tasks.registry import MANIFEST

if TYPE_CHECKING:
    from tasks.check import Check

RETRAIN_KINDS = ("drift", "quality")  # incidents a new model can fix; a rollback or a slow service cannot


@dataclass(frozen=True)
class RetrainRequest:
    status: str
    flow_run_id: str | None
    extra_rows: str | None = None


def labelled_rows_file(window: LoggedRows, labelled: pd.DataFrame, target: str, ignored: list[str]) -> Path:
    """Labelled production rows as a training table (inputs + target), for a retraining run. The
    columns the model ignored (`ignored`: the log never kept them) are named in the file, so that the
    retraining run leaves them out of the whole table (tasks/data.py: append_extra_rows)."""
    rows = window.inputs.iloc[labelled["position"].to_numpy()].reset_index(drop=True)
    rows[target] = labelled["label"].to_numpy()
    rows.attrs[MODEL_IGNORED] = list(ignored)
    folder = maas_home() / "monitoring"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"labelled-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.parquet"
    rows.to_parquet(path, index=False)
    return path


def training_config(check: Check) -> RunConfig | None:
    """The config the watched model is retrained with: this monitor's own where it watches its own
    model; else the one the watched version was trained with, from its run's manifest.json. With
    `--set monitoring.model=maas-orders@champion` and no --config, the monitor's config is the
    default's, and the retrain trained breast_cancer under the orders model's name. None: no
    readable manifest."""
    config = check.config
    if check.watched.ref.name == config.model_name:
        return config
    if check.watched.run_id is None:
        return None
    from pydantic import ValidationError

    from maas.tracking import mlflow_client

    try:
        with tempfile.TemporaryDirectory() as scratch:
            manifest = Path(mlflow_client().download_artifacts(check.watched.run_id, MANIFEST, scratch)).read_text()
        trained = RunConfig.model_validate(json.loads(manifest)["config"])
    except (OSError, MlflowException, ValueError, KeyError, ValidationError):  # a JSONDecodeError is a ValueError
        return None
    if config.monitoring.retrain_deployment:  # named for this monitor: it stays the one run
        trained.monitoring.retrain_deployment = config.monitoring.retrain_deployment
    return trained


def trigger_retrain(config: RunConfig, reasons: list[str], extra_rows: Path | None) -> RetrainRequest:
    """A run of the training deployment, started and left to run (it outlives this check)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    retrain_config = config
    if extra_rows is not None:
        retrain_config = config.model_copy(deep=True)
        retrain_config.data.extra_paths = [*config.data.extra_paths, str(extra_rows)]
    deployment = config.train_deployment
    try:
        flow_run = run_deployment(deployment, parameters={"config": retrain_config.model_dump(mode="json")}, timeout=0,
                                  tags=["maas", "retrain"], as_subflow=False)
    except ObjectNotFound:
        return RetrainRequest(f"wanted ({'; '.join(reasons)}) but deployment '{deployment}' is not "
                              "registered: start `maas schedule`", None)
    status = f"triggered {deployment} flow run {flow_run.name} ({'; '.join(reasons)})"
    connection = connect()
    try:
        audit.append(connection, "retrain.trigger", deployment, None, f"flow run {flow_run.name}",
                     "; ".join(reasons)[:1000], "monitoring flow")
    finally:
        connection.close()
    return RetrainRequest(status, str(flow_run.id), str(extra_rows) if extra_rows else None)


def maybe_retrain(check: Check, alerts: AlertOutcome, rollback: RollbackDecision | None) -> RetrainRequest | None:
    """Retrain when a drift or quality incident opened in this check, unless it just rolled back."""
    reasons = [alert.message for alert in alerts.new if alert.kind in RETRAIN_KINDS]
    if not reasons or not check.monitoring.retrain or (rollback and rollback.roll_back):
        return None
    labelled = check.labelled
    metadata = check.watched.bundle.metadata
    extra = (labelled_rows_file(check.recent, labelled, metadata["target"], list(metadata.get("dropped_columns", {})))
             if check.monitoring.append_labelled and labelled is not None and len(labelled) and not check.hidden_inputs
             else None)  # rows whose inputs the log keeps hashed or dropped are no training data
    config = training_config(check)
    if config is None:
        return RetrainRequest(f"wanted ({'; '.join(reasons)}) but {check.watched.ref.name} was not trained with this "
                              "monitor's config and its run has no readable manifest.json: pass its config (--config)",
                              None)
    return trigger_retrain(config, reasons, extra)


def record_retrain(ctx: RunContext, request: RetrainRequest | None) -> None:
    if request is not None:
        (ctx.logger.info if request.flow_run_id else ctx.logger.warning)("retraining: %s", request.status)


@task(name="retrain", retries=0, cache_policy=NO_CACHE)
def retrain_task(check: Check, alerts: AlertOutcome, rollback: RollbackDecision | None) -> RetrainRequest | None:
    return check.ctx.run_stage("retrain", partial(maybe_retrain, check, alerts, rollback), record_retrain)
