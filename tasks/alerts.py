"""Alerts: one per incident, not one per check.

An incident opens the first time a condition fires (drift, quality, error_rate, latency, rollback)
and stays open while it keeps firing; only the opening alerts. It closes at the first check where
the condition is gone, so the next time it fires is a new incident. Alerts go to the log (a
WARNING line) and, when configured, to a Prefect notification block (Slack, a webhook, e-mail...).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from maas.run_context import RunContext
from maas.service_store import close_incident, open_incident, open_incidents

if TYPE_CHECKING:
    from tasks.check import Check

ONE_SHOT = ("rollback",)  # events, not conditions: they close again at the next check


@dataclass(frozen=True)
class Alert:
    kind: str
    message: str


def new_alerts(connection: sqlite3.Connection, model: str, firing: dict[str, str]) -> list[Alert]:
    """Open incidents for conditions that started firing, close those that stopped; returns the new ones."""
    already = open_incidents(connection, model)
    for kind in already:
        if kind not in firing or kind in ONE_SHOT:
            close_incident(connection, model, kind)
    started = []
    for kind, message in firing.items():
        if kind not in already or kind in ONE_SHOT:
            open_incident(connection, model, kind, message)
            started.append(Alert(kind, message))
    return started


def send_alerts(alerts: list[Alert], model: str, block_name: str | None, logger: logging.Logger | logging.LoggerAdapter) -> int:
    """Log each alert and send it through the notification block; returns how many were delivered.
    The block is loaded on every check, alerts or not: a misspelt block name is told on the first
    check, not on the day an alert cannot be delivered."""
    delivered = 0
    for alert in alerts:
        logger.warning("ALERT %s [%s]: %s", model, alert.kind, alert.message)
    if not block_name:
        return delivered
    from prefect.blocks.core import Block

    try:
        block = Block.load(block_name)
    except (ValueError, RuntimeError) as error:  # a missing block must not lose the check's report
        logger.warning("notification block '%s' not loaded (%s); alerts are in the log only", block_name, error)
        return delivered
    for alert in alerts:
        try:
            block.notify(body=alert.message, subject=f"maas {model}: {alert.kind}")
            delivered += 1
        except Exception as error:  # noqa: BLE001 - a failed webhook is reported, the check goes on
            logger.warning("notification of %s alert through '%s' failed: %s", alert.kind, block_name, error)
    return delivered


@dataclass(frozen=True)
class AlertOutcome:
    """What the alert stage did: the conditions firing now, the alerts it opened, how many were delivered."""

    firing: dict[str, str]
    new: list[Alert] = field(default_factory=list)
    delivered: int = 0


def raise_alerts(check: Check, reports: list) -> AlertOutcome:
    """Every report's firing conditions (drift, quality, rollback, health: each has `firing()`)
    become incidents; the new ones are alerted."""
    firing: dict[str, str] = {}
    for report in reports:
        if report is not None:
            firing.update(report.firing())
    model = check.watched.ref.name
    alerts = new_alerts(check.connection, model, firing)
    delivered = send_alerts(alerts, model, check.monitoring.notify_block, check.ctx.logger)
    return AlertOutcome(firing, alerts, delivered)


def record_alerts(ctx: RunContext, outcome: AlertOutcome) -> None:
    ctx.record(metrics={"alerts/new": len(outcome.new)})


@task(name="alerts", retries=0, cache_policy=NO_CACHE)
def alert_task(check: Check, reports: list) -> AlertOutcome:
    return check.ctx.run_stage("alerts", partial(raise_alerts, check, reports), record_alerts)
