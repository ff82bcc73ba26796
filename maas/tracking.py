"""MLflow plumbing: the store, experiments, the parent run's lifecycle, batched metric logging.

Everything goes through an MlflowClient and explicit run ids rather than MLflow's fluent
"active run", which is per-thread state and breaks when Prefect runs a task in another thread.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from maas.locks import sqlite_schema_lock
from maas.paths import artifact_root, is_embedded_store, tracking_uri
from maas.termination import termination_requested

DEFAULT_UI_URL = "http://127.0.0.1:5000"
MLFLOW_PARAM_MAX = 6000  # MLflow rejects longer param values


_SCHEMA_READY: set[str] = set()  # SQLite store URIs this process has opened once


def mlflow_client():
    """A client on the configured store; also points MLflow's module-level URIs at it."""
    uri = tracking_uri()
    if not uri.startswith("sqlite") or uri in _SCHEMA_READY:
        return _client_on(uri)
    # MLflow makes or migrates a SQLite file's tables when a process first opens it: two `maas run`
    # started at once on a new MAAS_HOME both migrated, and one failed ("duplicate column name").
    with sqlite_schema_lock(uri):
        client = _client_on(uri)
        client.search_experiments(max_results=1)  # the tracking store, opened (its schema made) once
        client.search_registered_models(max_results=1)  # and the registry's, a store of its own
    _SCHEMA_READY.add(uri)
    return client


def _client_on(uri: str):
    import mlflow

    # A progress bar per artifact download is noise in a pipeline's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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


# MLflow 3's UI opens an experiment it cannot classify on its GenAI overview (traces, an assistant
# panel); marked as model development, it opens on the runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, creating it (with artifacts under MAAS_HOME when embedded), marked as a
    model-training experiment for the MLflow UI."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (artifact_root() / name).as_uri() if is_embedded_store() else None
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


@contextmanager
def parent_run(client, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """Open a run and always close it: FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM (also
    where the signal came wrapped in another error: maas/termination.py)."""
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    run_id = run.info.run_id
    try:
        yield run_id
    except Exception:
        client.set_terminated(run_id, status="KILLED" if termination_requested() else "FAILED")
        raise
    except BaseException:
        client.set_terminated(run_id, status="KILLED")
        raise
    client.set_terminated(run_id, status="FINISHED")


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


URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def redact_url(text: str) -> str:
    """The text with the password of any URL in it replaced by *** (database, Redis, object store
    URLs), for logs, error lines and MLflow params."""
    return URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)


def redact_passwords(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params with the password of any URL in them (tuning.storage, serving.redis_url) replaced: a
    run's params are shown to everyone who can read the experiment."""
    return {name: redact_url(value) if isinstance(value, str) else value for name, value in params.items()}


MLFLOW_KEY_MAX = 250
NOT_IN_MLFLOW_KEYS = re.compile(r"[^/\w.\- :]")


def mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts: a column's name goes into some ("drift/psi/Price ($)"),
    and MLflow refuses the whole batch for one character outside letters, digits, `_-. :/` or a
    path-like part ('', '.', '..'): those become '_'."""
    parts = NOT_IN_MLFLOW_KEYS.sub("_", name).split("/")
    return "/".join("_" if part in ("", ".", "..") else part for part in parts)[:MLFLOW_KEY_MAX]


def metric_entities(metrics: Mapping[str, float], step: int = 0) -> list:
    """MLflow Metric objects for one step, stamped now, for log_batch (names made ones MLflow takes)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(mlflow_key(key), float(value), now, step) for key, value in metrics.items()]


def ui_base_url() -> str:
    """Where `maas ui` (or the team's tracking server) shows runs."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("MAAS_MLFLOW_UI_URL", DEFAULT_UI_URL).rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/#/experiments/{experiment_id}/runs/{run_id}"
