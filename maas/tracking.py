"""MLflow plumbing: the store, experiments, the parent run's lifecycle, batched metric logging.

Everything goes through an MlflowClient and explicit run ids rather than MLflow's fluent
"active run", which is per-thread state and breaks when Prefect runs a task in another thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from maas.paths import artifact_root, is_embedded_store, tracking_uri

DEFAULT_UI_URL = "http://127.0.0.1:5000"
MLFLOW_PARAM_MAX = 6000  # MLflow rejects longer param values


def mlflow_client():
    """A client on the configured store; also points MLflow's module-level URIs at it."""
    import mlflow

    # A progress bar per artifact download is noise in a pipeline's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    uri = tracking_uri()
    # set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI; put the user's values back,
    # or every later call would take the embedded store for a team server (see is_embedded_store).
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return mlflow.MlflowClient(uri, registry_uri=uri)


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, creating it (with artifacts under MAAS_HOME when embedded)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (artifact_root() / name).as_uri() if is_embedded_store() else None
    return client.create_experiment(name, artifact_location=location)


@contextmanager
def parent_run(client, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """Open a run and always close it: FINISHED, FAILED on an error, KILLED on Ctrl-C."""
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    run_id = run.info.run_id
    try:
        yield run_id
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    except BaseException:
        client.set_terminated(run_id, status="KILLED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def start_child_run(client, experiment_id: str, parent_run_id: str, name: str, tags: Mapping[str, str]) -> str:
    """A run nested under the parent in the MLflow UI (by tag: the fluent API is not thread-safe)."""
    run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, **tags})
    return run.info.run_id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    entries = [Param(key, str(value)[:MLFLOW_PARAM_MAX]) for key, value in params.items()]
    for start in range(0, len(entries), 100):  # MLflow's per-batch param limit
        client.log_batch(run_id, params=entries[start : start + 100])


def metric_entities(metrics: Mapping[str, float], step: int = 0) -> list:
    """MLflow Metric objects for one step, stamped now, for log_batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in metrics.items()]


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    entries = metric_entities(metrics, step)
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])


class MetricBuffer:
    """Per-epoch metrics, written in batches: one SQLite write per flush, not one per value."""

    def __init__(self, client, run_id: str, flush_every: int = 25):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self.pending: list = []
        self.steps_since_flush = 0

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        self.pending += metric_entities(metrics, step)
        self.steps_since_flush += 1
        if self.steps_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending, self.steps_since_flush = [], 0


def ui_base_url() -> str:
    """Where `maas ui` (or the team's tracking server) shows runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("MAAS_MLFLOW_UI_URL", DEFAULT_UI_URL).rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/#/experiments/{experiment_id}/runs/{run_id}"
