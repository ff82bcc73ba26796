"""The Prefect deployments: training (weekly) and monitoring (hourly) of one model, on cron schedules.

Both carry the whole run config as their `config` parameter, so a scheduled run is exactly
`maas run` / `maas monitor` with that config file, and the Prefect UI shows what it will run.
Names and tags say which model and config they serve. The training deployment has a concurrency
limit of 1: a retrain triggered while the weekly run is going waits for it instead of overlapping.

`maas schedule` serves them from this machine (a Prefect runner; it is its own worker). With a
Prefect server, the same deployments can go to a work pool instead (`maas schedule --pool NAME`)
and a `prefect worker start --pool NAME` started in this project folder runs them.
"""

from __future__ import annotations

from pathlib import Path

from maas.config import RunConfig
from tasks.check import watched_reference


def deployment_names(config: RunConfig) -> tuple[str, str]:
    """(training, monitoring) deployment names: the training one is the config's model's, which its
    monitor triggers; the monitoring one is named after the model it watches (monitoring.model, when
    that names another: `--set monitoring.model=maas-orders@champion` watches maas-orders)."""
    return f"{config.model_name}-train", f"{watched_reference(config).name}-monitor"


def deployment_tags(config: RunConfig, config_path: str | Path | None, role: str) -> list[str]:
    source = Path(config_path).name if config_path else "embedded-defaults"
    model = watched_reference(config).name if role == "monitoring" else config.model_name
    return ["maas", role, f"model:{model}", f"dataset:{config.data.short_name}", f"config:{source}"]


def retrain_elsewhere(config: RunConfig) -> str | None:
    """A line for `maas schedule` when the monitor watches another model than the config trains: its
    retrain runs that model's own training deployment (tasks/retrain.training_config), not this one."""
    watched = watched_reference(config).name
    if watched == config.model_name or config.monitoring.retrain_deployment:
        return None
    return (f"note: the monitor watches {watched}, whose retrain runs maas-train/{watched}-train with the config "
            f"that version was trained with; schedule that model's training too, or set monitoring.retrain_deployment")


def build_deployments(config: RunConfig, config_path: str | Path | None = None) -> list:
    """RunnerDeployments for `serve` (this machine) or `apply` (a work pool)."""
    from prefect.schedules import Cron

    from flows.monitor import monitor
    from flows.train_pipeline import train_pipeline

    train_name, monitor_name = deployment_names(config)
    parameters = {"config": config.model_dump(mode="json")}
    schedule = config.schedule
    training = train_pipeline.to_deployment(
        name=train_name,
        schedules=[Cron(schedule.train_cron, timezone=schedule.timezone)],
        parameters=parameters,
        tags=deployment_tags(config, config_path, "training"),
        concurrency_limit=1,  # never two training runs of one model at once; later ones wait
        description=f"Train, compress, evaluate and register {config.model_name}; promoted only past the gate.",
    )
    monitoring = monitor.to_deployment(
        name=monitor_name,
        schedules=[Cron(schedule.monitor_cron, timezone=schedule.timezone)],
        parameters=parameters,
        tags=deployment_tags(config, config_path, "monitoring"),
        concurrency_limit=1,
        description=f"Drift, live quality and health of {watched_reference(config)}; alerts and retraining.",
    )
    return [training, monitoring]
