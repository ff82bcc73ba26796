"""One monitoring check: the registered version it watches, the prediction-log rows it covers, and
the MLflow run (in the monitoring experiment) it records into. Every monitoring task reads this."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from maas.bundle import ModelBundle
from maas.config import MonitoringConfig, RunConfig
from maas.errors import MaasInputError
from maas.paths import maas_home
from maas.privacy import purge_predictions
from maas.registered import REPLACED_TAG, ModelRef, download_bundle
from maas.run_context import RunContext, open_run
from maas.tracking import mlflow_client
from maas.service_store import connect_settled, last_check, save_check
from tasks.drift import read_reference
from tasks.prediction_log import LoggedRows, labelled_rows, read_ground_truth, read_logged_rows


@dataclass
class WatchedModel:
    """The registered version the monitor checks, with its bundle and drift reference."""

    ref: ModelRef  # its version resolved
    bundle: ModelBundle
    reference: dict[str, Any]
    replaced_version: str | None  # the champion it replaced, what a rollback returns to
    run_id: str | None = None  # the training run, whose manifest.json holds the config it was trained with

    @property
    def label(self) -> str:
        return self.ref.label


def watched_reference(config: RunConfig) -> ModelRef:
    return ModelRef.parse(config.monitoring.model or f"{config.model_name}@{config.registry.champion_alias}",
                          config.registry.champion_alias, what="monitoring.model")


def resolve_watched(client, config: RunConfig, scratch: Path) -> WatchedModel:
    """The version behind the watched alias; bad input (no such model, no reference) is one line."""
    wanted = watched_reference(config)
    try:
        ref, found = wanted.resolve(client, "monitoring.model")
    except MaasInputError as missing:
        raise MaasInputError(f"{missing}; train one with `maas run`, or name it with --dataset or "
                             "--set monitoring.model=NAME@ALIAS") from None
    bundle_dir = download_bundle(ref, scratch / f"v{ref.version}")
    drift_reference = read_reference(bundle_dir)
    if drift_reference is None:
        raise MaasInputError(f"{ref.name} version {ref.version} has no drift reference in its bundle "
                             "(registered before monitoring existed); retrain it with `maas run`")
    return WatchedModel(ref, ModelBundle.load(bundle_dir), drift_reference, found.tags.get(REPLACED_TAG), found.run_id)


class Check:
    """What one check covers. A plain class, not a dataclass: Prefect walks every field of a
    dataclass handed to a task, and the reference alone holds tens of thousands of values."""

    def __init__(self, ctx: RunContext, config: RunConfig, watched: WatchedModel, connection: sqlite3.Connection,
                 at: float):
        self.ctx, self.config, self.watched, self.connection, self.at = ctx, config, watched, connection, at
        self.since, self.previous_counters = last_check(connection, watched.ref.name)
        self.counters: dict[str, Any] | None = None  # this check's scrape of the service, kept for the next
        self.quality_start = at - self.monitoring.quality_window_hours * 3600
        # One read of the log covers both windows: since the last check (drift), and recent (quality).
        start = min(self.since, self.quality_start) if self.monitoring.labels_path else self.since
        self.window = read_logged_rows(connection, watched.ref.name, start, at)

    @property
    def monitoring(self) -> MonitoringConfig:
        return self.config.monitoring

    @cached_property
    def logged(self) -> LoggedRows:
        """The rows logged since the previous check: what drift is judged on."""
        return self.window.logged_after(self.since)

    @cached_property
    def recent(self) -> LoggedRows:
        """The rows of the quality window."""
        return self.window.logged_after(self.quality_start)

    @property
    def hidden_inputs(self) -> list[str]:
        """The model's input columns the prediction log does not keep in clear (serving.privacy):
        logged rows cannot be re-scored or trained on then."""
        columns = [column["name"] for column in self.watched.bundle.metadata["input_schema"]]
        return [column for column in columns if self.config.serving.privacy.policy(column) != "keep"]

    @cached_property
    def labelled(self) -> pd.DataFrame | None:
        """The recent rows whose ground truth arrived (monitoring.labels_path), or None without labels."""
        if not self.monitoring.labels_path:
            return None
        source = self.monitoring.labels_path
        labelled, notes = labelled_rows(self.recent, read_ground_truth(source), self.watched.bundle.labels, source)
        for note in notes:
            self.ctx.logger.warning(note)
        return labelled


def monitoring_experiment(config: RunConfig, watched_name: str) -> str:
    """Where a check is recorded: the config's monitoring experiment for its own model; for a model
    it names with monitoring.model alone, that model's (maas-orders-monitoring), not the default
    config's breast_cancer one."""
    if config.monitoring.experiment or watched_name == config.model_name:
        return config.monitoring_experiment
    return f"{watched_name}-monitoring"


@contextmanager
def open_check(config: RunConfig) -> Iterator[Check]:
    """A check of the watched model over the log since the last one, as an MLflow run in the
    monitoring experiment; the check's end (and its service scrape) is saved for the next one."""
    connection = connect_settled()  # with the requests journaled by service workers that are gone
    at = time.time()
    name = f"check-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    with tempfile.TemporaryDirectory(dir=maas_home(), prefix="monitor-") as scratch:
        watched = resolve_watched(mlflow_client(), config, Path(scratch))  # before the run: bad input leaves none
        tags = {"maas.check": "monitor", "maas.model": watched.ref.name, "maas.model_version": watched.ref.version}
        with open_run(monitoring_experiment(config, watched.ref.name), name, tags) as ctx:
            check = Check(ctx, config, watched, connection, at)
            yield check
            save_check(connection, watched.ref.name, at, check.counters)
            retention = config.serving.privacy.retention_days
            if retention:  # logged inputs past serving.privacy.retention_days go; usage and bills stay
                purged = purge_predictions(connection, retention, actor="monitoring flow")
                ctx.logger.info("purged %d logged request(s) older than %g days", purged, retention)
