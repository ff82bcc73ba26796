"""Retraining: a new drift or quality incident runs the training deployment; the promotion gate
still decides what the new version becomes. Labelled production rows can join its training data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from maas import audit
from maas.config import RunConfig
from maas.paths import maas_home
from maas.run_context import RunContext
from maas.service_store import connect
from tasks.alerts import AlertOutcome
from tasks.prediction_log import LoggedRows
from tasks.quality import RollbackDecision

if TYPE_CHECKING:
    from tasks.check import Check

RETRAIN_KINDS = ("drift", "quality")  # incidents a new model can fix; a rollback or a slow service cannot


@dataclass(frozen=True)
class RetrainRequest:
    status: str
    flow_run_id: str | None
    extra_rows: str | None = None


def labelled_rows_file(window: LoggedRows, labelled: pd.DataFrame, target: str) -> Path:
    """Labelled production rows as a training table (inputs + target), for a retraining run."""
    rows = window.inputs.iloc[labelled["position"].to_numpy()].reset_index(drop=True)
    rows[target] = labelled["label"].to_numpy()
    folder = maas_home() / "monitoring"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"labelled-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.parquet"
    rows.to_parquet(path, index=False)
    return path


def trigger_retrain(config: RunConfig, reasons: list[str], extra_rows: Path | None) -> RetrainRequest:
    """A run of the training deployment, started and left to run (it outlives this check)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    retrain_config = config
    if extra_rows is not None:
        retrain_config = config.model_copy(deep=True)
        retrain_config.data.extra_paths = [*config.data.extra_paths, str(extra_rows)]
    try:
        flow_run = run_deployment(
            config.train_deployment, parameters={"config": retrain_config.model_dump(mode="json")}, timeout=0,
            tags=["maas", "retrain"], as_subflow=False,
        )
    except ObjectNotFound:
        return RetrainRequest(f"wanted ({'; '.join(reasons)}) but deployment '{config.train_deployment}' is not "
                              "registered: start `maas schedule`", None)
    status = f"triggered {config.train_deployment} flow run {flow_run.name} ({'; '.join(reasons)})"
    connection = connect()
    try:
        audit.append(connection, "retrain.trigger", config.train_deployment, None, f"flow run {flow_run.name}",
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
    extra = (labelled_rows_file(check.recent, labelled, check.watched.bundle.metadata["target"])
             if check.monitoring.append_labelled and labelled is not None and len(labelled) and not check.hidden_inputs
             else None)  # rows whose inputs the log keeps hashed or dropped are no training data
    return trigger_retrain(check.config, reasons, extra)


def record_retrain(ctx: RunContext, request: RetrainRequest | None) -> None:
    if request is not None:
        (ctx.logger.info if request.flow_run_id else ctx.logger.warning)("retraining: %s", request.status)


@task(name="retrain", retries=0, cache_policy=NO_CACHE)
def retrain_task(check: Check, alerts: AlertOutcome, rollback: RollbackDecision | None) -> RetrainRequest | None:
    return check.ctx.run_stage("retrain", partial(maybe_retrain, check, alerts, rollback), record_retrain)
