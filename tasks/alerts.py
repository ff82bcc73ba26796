"""Alerts: one per incident, not one per check.

An incident opens the first time a condition fires (drift, quality, error_rate, latency, rollback)
and stays open while it keeps firing; only the opening alerts. It closes at the first check where
the condition is gone, so the next time it fires is a new incident. Alerts go to the log (a
WARNING line) and, when configured, to a Prefect notification block (Slack, a webhook, e-mail...).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from maas.service_store import close_incident, open_incident, open_incidents

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
    """Log each alert and send it through the notification block; returns how many were delivered."""
    delivered = 0
    for alert in alerts:
        logger.warning("ALERT %s [%s]: %s", model, alert.kind, alert.message)
    if not alerts or not block_name:
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
