"""The monitoring flow: one check of the served model over its prediction log since the last check.

    resolve the watched version (registry alias) and its drift reference (in the bundle)
      ├─ drift         logged inputs and predictions vs the training reference (PSI, KS)
      ├─ live quality  logged predictions vs ground truth that arrived (labels file)
      ├─ rollback      a new champion worse live than the one it replaced gives the alias back
      ├─ health        the service's /metrics: request rate, 5xx rate, p99, CPU, memory
      ├─ alerts        one per incident: log line + Prefect notification block
      ├─ retrain       drift or decay runs the training deployment (the gate still decides)
      └─ report        an MLflow run in the monitoring experiment + Prefect artifacts
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from maas.bundle import ModelBundle
from maas.config import RunConfig
from maas.errors import MaasInputError
from maas.paths import maas_home
from maas.service_store import connect, last_check, record_check
from maas.tracking import ensure_experiment, log_metrics, mlflow_client, parent_run, run_url
from tasks.alerts import new_alerts, send_alerts
from tasks.drift import DriftReport, measure_drift, plot_drift, read_reference
from tasks.health import HealthReport, health_report, scrape
from tasks.monitor_report import render_html
from tasks.prediction_log import LoggedRows, read_ground_truth, read_logged_rows, with_ground_truth
from tasks.quality import QualityReport, RollbackDecision, label_metrics, live_quality, predicted_labels, rollback_decision
from tasks.registry import download_bundle


@dataclass
class WatchedModel:
    """The registered version the monitor checks, with its bundle and drift reference."""

    name: str
    version: str
    alias: str | None
    bundle: ModelBundle
    reference: dict[str, Any]
    replaced_version: str | None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}" + (f"@{self.alias}" if self.alias else "")


def watched_reference(config: RunConfig) -> str:
    return config.monitoring.model or f"{config.model_name}@{config.registry.champion_alias}"


def resolve_watched(client, config: RunConfig, scratch: Path) -> WatchedModel:
    """The version behind the watched alias; bad input (no such model, no reference) is one line."""
    from mlflow.exceptions import MlflowException

    from tasks.package import parse_reference

    reference = watched_reference(config)
    name, alias, version = parse_reference(reference)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise MaasInputError(f"monitoring.model '{reference}': no such registered model version "
                             "(train one with `maas run`)") from None
    version = str(found.version)
    bundle_dir = download_bundle(name, version, scratch / f"v{version}")
    drift_reference = read_reference(bundle_dir)
    if drift_reference is None:
        raise MaasInputError(f"{name} version {version} has no drift reference in its bundle "
                             "(registered before monitoring existed); retrain it with `maas run`")
    return WatchedModel(name, version, alias, ModelBundle.load(bundle_dir), drift_reference,
                        found.tags.get("replaced_champion_version"))


def check_rollback(client, watched: WatchedModel, window: LoggedRows, labelled: pd.DataFrame, config: RunConfig,
                   scratch: Path) -> RollbackDecision:
    """Score the replaced champion on the labelled rows the new champion served; roll back if it wins."""
    monitoring = config.monitoring
    mine = labelled[labelled["version"] == watched.version]
    new_f1 = old_f1 = None
    if watched.replaced_version and len(mine) >= monitoring.min_labelled_rows:
        old = ModelBundle.load(download_bundle(watched.name, watched.replaced_version, scratch / "replaced"))
        rows = window.inputs.iloc[mine["position"].to_numpy()]
        labels = watched.bundle.labels
        new_f1 = label_metrics(mine["label"], mine["predicted"], labels)["f1_macro"]
        old_f1 = label_metrics(mine["label"], pd.Series(predicted_labels(old, rows), index=mine.index), labels)["f1_macro"]
    decision = rollback_decision(watched.version, watched.replaced_version, new_f1, old_f1, len(mine),
                                 monitoring.min_labelled_rows, monitoring.rollback_margin)
    if decision.roll_back:
        client.set_registered_model_alias(watched.name, watched.alias, watched.replaced_version)
        client.set_model_version_tag(watched.name, watched.version, "rolled_back", decision.reason[:500])
    return decision


def labelled_rows_file(window: LoggedRows, labelled: pd.DataFrame, target: str) -> Path:
    """Labelled production rows as a training table (inputs + target), for a retraining run."""
    rows = window.inputs.iloc[labelled["position"].to_numpy()].reset_index(drop=True)
    rows[target] = labelled["label"].to_numpy()
    folder = maas_home() / "monitoring"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"labelled-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.parquet"
    rows.to_parquet(path, index=False)
    return path


def trigger_retrain(config: RunConfig, reasons: list[str], extra_rows: Path | None) -> dict[str, Any]:
    """A run of the training deployment; the promotion gate decides what the new model becomes."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    retrain_config = config
    if extra_rows is not None:
        retrain_config = config.model_copy(deep=True)
        retrain_config.data.extra_paths = [*config.data.extra_paths, str(extra_rows)]
    try:
        flow_run = run_deployment(
            config.train_deployment, parameters={"config": retrain_config.model_dump(mode="json")}, timeout=0,
            tags=["maas", "retrain"], as_subflow=False,  # the training run outlives this check
        )
    except ObjectNotFound:
        return {"status": f"wanted ({'; '.join(reasons)}) but deployment '{config.train_deployment}' is not "
                          "registered: start `maas schedule`", "flow_run_id": None}
    return {"status": f"triggered {config.train_deployment} flow run {flow_run.name} ({'; '.join(reasons)})",
            "flow_run_id": str(flow_run.id), "extra_rows": str(extra_rows) if extra_rows else None}


def check_metrics(drift: DriftReport, quality: QualityReport | None, health: HealthReport | None,
                  rollback: RollbackDecision | None) -> dict[str, float]:
    """The check's figures as MLflow metrics, grouped by kind."""
    figures: dict[str, float | None] = {"drift/n_rows": drift.n_rows, "drift/share": drift.drift_share,
                                        "drift/n_drifted": len(drift.drifted_features),
                                        "drift/prediction_psi": drift.prediction_psi}
    figures.update({f"drift/psi/{feature.name}": feature.psi for feature in drift.features})
    if quality is not None:
        figures.update({f"live/{name}": value for name, value in quality.metrics.items()})
        figures["live/n_labelled"] = quality.n_labelled
        figures["live/f1_drop"] = quality.f1_drop
    if health is not None:
        figures.update({"health/request_rate": health.request_rate, "health/error_rate": health.error_rate,
                        "health/p99_ms": health.p99_ms, "health/cpu_percent": health.cpu_percent,
                        "health/memory_bytes": health.memory_bytes})
    if rollback is not None and rollback.old_f1 is not None:
        figures["rollback/replaced_f1"] = rollback.old_f1
    return {name: float(value) for name, value in figures.items() if value is not None}


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


@flow(name="maas-monitor", description="Drift, live quality and service health of the served model; alerts; retraining.")
def monitor(config: RunConfig) -> dict[str, Any]:
    logger = get_run_logger()
    monitoring = config.monitoring
    client = mlflow_client()
    connection = connect()
    now = time.time()
    with tempfile.TemporaryDirectory(dir=maas_home(), prefix="monitor-") as scratch_dir:
        scratch = Path(scratch_dir)
        watched = resolve_watched(client, config, scratch)
        since, previous_counters = last_check(connection, watched.name)
        experiment_id = ensure_experiment(client, config.monitoring_experiment)
        tags = {"maas.model": watched.name, "maas.model_version": watched.version, "maas.check": "monitor"}
        with parent_run(client, experiment_id, f"check-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}", tags) as run_id:
            # One read of the log covers both windows: since the last check (drift) and recent (quality).
            quality_start = now - monitoring.quality_window_hours * 3600
            window_start = min(since, quality_start) if monitoring.labels_path else since
            window = read_logged_rows(connection, watched.name, window_start, now)

            # Drift: the rows logged since the last check against the reference in the bundle.
            logged = window.logged_after(since)
            drift = measure_drift(logged.inputs, logged.meta["predicted"], watched.reference, monitoring.drift)
            firing: dict[str, str] = {}
            if drift.alert:
                firing["drift"] = (f"{len(drift.drifted_features)} of {len(drift.features)} features drifted "
                                   f"(PSI > {monitoring.drift.psi_threshold}): {', '.join(drift.drifted_features[:8])}")

            # Live quality and rollback: labelled predictions of the recent window.
            quality = rollback = labelled = None
            if monitoring.labels_path:
                window = window.logged_after(quality_start)
                labelled = with_ground_truth(window, read_ground_truth(monitoring.labels_path))
                quality = live_quality(labelled, watched.version, watched.bundle.labels,
                                       watched.bundle.metadata.get("metrics", {}), monitoring.min_labelled_rows,
                                       monitoring.max_quality_drop)
                if quality.alert:
                    firing["quality"] = (f"live F1 {quality.metrics['f1_macro']:.4f} on {quality.n_labelled} labelled rows "
                                         f"is {quality.f1_drop:.4f} below the test F1 "
                                         f"{quality.test_metrics.get('f1_macro', float('nan')):.4f}")
                if monitoring.rollback and watched.alias:  # a pinned version (NAME/3) has no alias to roll back
                    rollback = check_rollback(client, watched, window, labelled, config, scratch)
                    if rollback.roll_back:
                        firing["rollback"] = f"@{watched.alias} rolled back to v{watched.replaced_version}: {rollback.reason}"

            # Health: the service's own counters, as rates since the last scrape.
            health, counters = None, None
            if monitoring.metrics_url:
                try:
                    counters = scrape(monitoring.metrics_url)
                except Exception as error:  # noqa: BLE001 - a service that is down is a finding, not a crash
                    firing["service_down"] = f"{monitoring.metrics_url} did not answer: {error.__class__.__name__}"
                else:
                    health = health_report(counters, previous_counters, monitoring.max_error_rate, monitoring.max_p99_ms)
                    firing.update(health.alerts)

            # Alerts: one per incident; retraining when drift or decay opened one.
            alerts = new_alerts(connection, watched.name, firing)
            delivered = send_alerts(alerts, watched.name, monitoring.notify_block, logger)
            retrain = None
            reasons = [alert.message for alert in alerts if alert.kind in ("drift", "quality")]
            if reasons and monitoring.retrain and not (rollback and rollback.roll_back):
                extra = (labelled_rows_file(window, labelled, watched.bundle.metadata["target"])
                         if monitoring.append_labelled and labelled is not None and len(labelled) else None)
                retrain = trigger_retrain(config, reasons, extra)
                (logger.info if retrain["flow_run_id"] else logger.warning)("retraining: %s", retrain["status"])
            record_check(connection, watched.name, now, counters)

            summary = {
                "model": watched.label, "checked_at": iso(now), "window_start": iso(since),
                "prefect_flow_run_id": str(get_run_context().flow_run.id),
                "mlflow_run_id": run_id, "mlflow_run_url": run_url(experiment_id, run_id),
                "drift": drift.to_dict(),
                "quality": None if quality is None else quality.to_dict(),
                "rollback": None if rollback is None else vars(rollback),
                "health": None if health is None else health.to_dict(),
                "alerts": [vars(alert) for alert in alerts], "alerts_delivered": delivered,
                "open_incidents": sorted(firing), "retrain": retrain,
            }
            report_artifacts(client, run_id, summary, drift, logged, watched, config, scratch)
            log_metrics(client, run_id, {**check_metrics(drift, quality, health, rollback), "alerts/new": len(alerts)})
    create_markdown_artifact(key="monitoring-report", markdown=markdown_summary(summary),
                             description=f"Monitoring check of {watched.label}")
    create_table_artifact(key="drift-features", table=[
        {"feature": f["name"], "psi": round(f["psi"], 4), "ks_pvalue": f["ks_pvalue"], "drifted": f["drifted"]}
        for f in sorted(summary["drift"]["features"], key=lambda item: item["psi"], reverse=True)
    ], description=f"Drift of {drift.n_rows} logged rows against the training reference")
    logger.info("checked %s: %d rows, %d/%d features drifted, %d new alert(s)", watched.label, drift.n_rows,
                len(drift.drifted_features), len(drift.features), len(alerts))
    return summary


def report_artifacts(client, run_id: str, summary: dict[str, Any], drift: DriftReport, logged: LoggedRows,
                     watched: WatchedModel, config: RunConfig, scratch: Path) -> None:
    """drift/report.html (the page to open), drift/drift.png and the check's JSON, on the MLflow run."""
    png = None
    if drift.n_rows and drift.features:
        png = plot_drift(drift, logged.inputs, watched.reference, config.monitoring.drift.psi_threshold, scratch / "drift.png")
        client.log_artifact(run_id, str(png), artifact_path="drift")
    client.log_text(run_id, render_html(summary, png), "drift/report.html")
    client.log_text(run_id, json.dumps(summary, indent=1, default=str), "check.json")


def markdown_summary(summary: dict[str, Any]) -> str:
    drift = summary["drift"]
    lines = [f"# {summary['model']}", "",
             f"{drift['n_rows']} logged rows since {summary['window_start']}: "
             f"{len(drift['drifted_features'])} of {len(drift['features'])} features drifted.", ""]
    if summary["quality"]:
        quality = summary["quality"]
        lines.append(f"Live F1 {quality['metrics'].get('f1_macro', float('nan')):.4f} on {quality['n_labelled']} labelled rows "
                     f"(test {quality['test_metrics'].get('f1_macro', float('nan')):.4f}).")
    lines += [f"- **{alert['kind']}**: {alert['message']}" for alert in summary["alerts"]] or ["No new alerts."]
    if summary["retrain"]:
        lines.append(f"\nRetraining: {summary['retrain']['status']}")
    lines.append(f"\n[MLflow run]({summary['mlflow_run_url']})")
    return "\n".join(lines)

