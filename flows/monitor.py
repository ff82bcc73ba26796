"""The monitoring flow: one check of the served model over its prediction log since the last check.

Each stage is a task in tasks/ that computes a finding and records it into the check's MLflow run;
this file only says in which order.
"""

from __future__ import annotations

import json

from prefect import flow

from flows.summaries import CheckSummary
from maas.config import RunConfig
from maas.prefect_fixes import end_flow_runs_promptly
from tasks.alerts import alert_task
from tasks.check import Check, open_check
from tasks.drift import drift_task
from tasks.health import health_task
from tasks.monitor_report import render_html
from tasks.quality import quality_task, rollback_task
from tasks.recovery import recover_task
from tasks.retrain import retrain_task

end_flow_runs_promptly()


@flow(name="maas-monitor", description="Drift, live quality and service health of the served model; alerts; retraining.")
def monitor(config: RunConfig) -> CheckSummary:
    """recover → watched version → drift → live quality → rollback → health → alerts → retrain → report"""
    # Recovery: runs, flow runs and versions a crashed run left RUNNING or half-made are settled first.
    recover_task()
    # The watched version (registry alias), its drift reference, the log since the last check.
    with open_check(config) as check:
        # Drift: the logged inputs and predictions against the training reference (PSI, KS).
        drift = drift_task(check)
        # Live quality: logged predictions against ground truth that arrived (labels file).
        quality = quality_task(check)
        # Rollback: a new champion worse live than the one it replaced gives the alias back.
        rollback = rollback_task(check)
        # Health: the service's /metrics as rates since the last scrape: requests, 5xx, p99, CPU, memory.
        health = health_task(check)
        # Alerts: one per incident, to the log and the Prefect notification block.
        alerts = alert_task(check, [drift, quality, rollback, health])
        # Retraining: a new drift or decay incident runs the training deployment (the gate still decides).
        retrain = retrain_task(check, alerts, rollback)
        summary = CheckSummary(check.watched.label, check.at, check.since, check.ctx.flow_run_id, check.ctx.run_id,
                               check.ctx.url, drift, quality, rollback, health, alerts, retrain)
        record_check(check, summary)
    return summary


def record_check(check: Check, summary: CheckSummary) -> None:
    """drift/report.html (the page to open) and check.json on the MLflow run; the check as a Prefect
    markdown artifact; one line in the log."""
    ctx, drift = check.ctx, summary.drift
    report = summary.to_dict()
    png = ctx.scratch / "drift" / "drift.png"  # written by the drift stage's record
    ctx.client.log_text(ctx.run_id, render_html(report, png if png.is_file() else None), "drift/report.html")
    ctx.client.log_text(ctx.run_id, json.dumps(report, indent=1, default=str), "check.json")
    ctx.describe(f"```\n{summary.render()}\n```")
    ctx.artifacts.markdown("monitoring-report", f"```\n{summary.render()}\n```\n\n[MLflow run]({ctx.url})",
                           f"Monitoring check of {summary.model}")
    ctx.logger.info("checked %s: %d rows, %d/%d features drifted, %d new alert(s)", summary.model, drift.n_rows,
                    len(drift.drifted_features), len(drift.features), len(summary.alerts.new))
