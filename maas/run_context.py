"""What every stage records into: one MLflow run, a scratch folder, one stage timer, and the Prefect
artifacts of the flow run. Stages compute; `record_<stage>(ctx, result)` writes through this.

Nothing here needs Prefect: outside a flow run the artifacts are kept in memory (tests, benchmarks,
plain calls), and logging goes to the `maas` logger.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from maas.budget import Budget
from maas.paths import maas_home, tracking_uri
from maas.processes import process_owner
from maas.recorder import Recorder
from maas.tracking import (MLFLOW_PARAM_MAX, ensure_experiment, metric_entities, mlflow_client, mlflow_key, parent_run,
                           run_url)

T = TypeVar("T")
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description on its MLflow UI page
MAX_TAG = 5000
LOCAL_PREFECT_UI = "http://127.0.0.1:4200"  # `prefect server start` on the same Prefect home


class StageTimer:
    """Seconds per stage, in one place: `compute` is the stage's own work, `record` what writing its
    result to MLflow and Prefect cost. Their difference from a plain call is the pipeline's overhead."""

    def __init__(self) -> None:
        self.compute: dict[str, float] = {}
        self.record: dict[str, float] = {}

    def run(self, stage: str, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Time `work` as the stage's compute; recording done inside it (trial child runs) is left out."""
        recorded_before = self.record.get(stage, 0.0)
        started = time.perf_counter()
        try:
            return work(*args, **kwargs)
        finally:
            recorded_inside = self.record.get(stage, 0.0) - recorded_before
            self.compute[stage] = self.compute.get(stage, 0.0) + time.perf_counter() - started - recorded_inside

    @contextmanager
    def measure(self, stage: str, into: dict[str, float]) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            into[stage] = into.get(stage, 0.0) + time.perf_counter() - started

    def recording(self, stage: str):
        return self.measure(stage, self.record)


class Artifacts:
    """The flow run's Prefect artifacts; outside a flow run (or in tests), kept in `self.made`."""

    def __init__(self, to_prefect: bool):
        self.to_prefect = to_prefect
        self.made: dict[str, dict[str, Any]] = {}

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        self.made[key] = {"kind": "table", "data": rows, "description": description}
        if self.to_prefect:
            from prefect.artifacts import create_table_artifact

            create_table_artifact(key=key, table=rows, description=description)

    def link(self, key: str, url: str, text: str) -> None:
        self.made[key] = {"kind": "link", "data": url, "description": text}
        if self.to_prefect:
            from prefect.artifacts import create_link_artifact

            create_link_artifact(key=key, link=url, link_text=text)

    def markdown(self, key: str, text: str, description: str) -> None:
        self.made[key] = {"kind": "markdown", "data": text, "description": description}
        if self.to_prefect:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(key=key, markdown=text, description=description)


    def progress(self, key: str, fraction: float, description: str) -> None:
        """A Prefect progress artifact (0-100 %) on the flow run, created once and then updated."""
        entry = self.made.setdefault(key, {"kind": "progress", "data": 0.0, "description": "", "id": None})
        entry.update(data=round(100 * min(1.0, max(0.0, fraction)), 1), description=description)
        if self.to_prefect:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if entry["id"] is None:
                entry["id"] = create_progress_artifact(entry["data"], key=key, description=description)
            else:
                update_progress_artifact(entry["id"], entry["data"], description=description)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task run, else the `maas` logger."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger("maas")


class RunRef(NamedTuple):
    """Which run a deferred job writes to, as plain data (it crosses into the recorder process)."""

    run_id: str
    experiment_id: str


# --- writes, as jobs: run in line, or by the recorder process (maas/recorder.py) ------------------


def write_batch(client, run_id: str, metrics: Mapping[str, float] | None = None, params: Mapping[str, Any] | None = None,
                tags: Mapping[str, str] | None = None, series: Iterable[tuple[int, Mapping[str, float]]] = ()) -> None:
    """Metrics (and `series`: metrics per step, e.g. per epoch), params and tags in one write, or as
    few as MLflow's batch limits (1000 metrics, 100 params) allow."""
    from mlflow.entities import Param, RunTag

    metric_list = metric_entities(metrics or {}) + [
        entry for step, values in series for entry in metric_entities(values, step)]
    param_list = [Param(mlflow_key(key), str(value)[:MLFLOW_PARAM_MAX]) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, str(value)[:MAX_TAG]) for key, value in (tags or {}).items()]
    first = True
    while first or metric_list or param_list:
        client.log_batch(run_id, metrics=metric_list[:1000], params=param_list[:100], tags=tag_list if first else [])
        metric_list, param_list, first = metric_list[1000:], param_list[100:], False


def write_child_run(client, parent: RunRef, name: str, tags: Mapping[str, str], figures: Mapping[str, Any],
                    files: Iterable[tuple[Path, str]] = (), status: str = "FINISHED") -> str:
    """A whole child run nested under `parent` in the MLflow UI (by tag: the fluent API is not
    thread-safe): created, its figures (write_batch's keyword arguments) and files, then closed."""
    run_id = client.create_run(parent.experiment_id, run_name=name,
                               tags={"mlflow.parentRunId": parent.run_id, **tags}).info.run_id
    if figures:
        write_batch(client, run_id, **figures)
    for path, folder in files:
        client.log_artifact(run_id, str(path), artifact_path=folder)
    client.set_terminated(run_id, status=status)
    return run_id


def write_file(client, run_id: str, path: Path, folder: str | None) -> None:
    client.log_artifact(run_id, str(path), artifact_path=folder)


def write_dict(client, run_id: str, data: Any, name: str) -> None:
    client.log_dict(run_id, data, name)


@dataclass
class RunContext:
    """One MLflow run and where a stage's byproducts go. `record` writes now, in one batch; `defer`
    hands a write to the recorder process when there is one, so the stage does not wait for it."""

    client: Any  # mlflow.MlflowClient
    run_id: str
    experiment_id: str
    scratch: Path
    timer: StageTimer = field(default_factory=StageTimer)
    artifacts: Artifacts = field(default_factory=lambda: Artifacts(to_prefect=False))
    flow_run_id: str | None = None  # the Prefect flow run this MLflow run belongs to, if any
    flow_run_name: str | None = None
    recorder: Recorder | None = None
    budget: Budget = field(default_factory=Budget)  # the run's time budget (maas/budget.py); unbounded by default

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter:
        return run_logger()

    @property
    def url(self) -> str:
        """The run's page in the MLflow UI."""
        return run_url(self.experiment_id, self.run_id)

    @property
    def ref(self) -> RunRef:
        return RunRef(self.run_id, self.experiment_id)

    def record(self, metrics: Mapping[str, float] | None = None, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, str] | None = None, series: Iterable[tuple[int, Mapping[str, float]]] = ()) -> None:
        """Figures on this run, now, in one batched write."""
        write_batch(self.client, self.run_id, metrics, params, tags, series)

    def defer(self, job: Callable[..., Any], *args: Any) -> None:
        """`job(client, *args)` by the recorder process, in submission order; in line without one."""
        if self.recorder is not None:
            self.recorder.submit(job, *args)
        else:
            job(self.client, *args)

    def run_stage(self, stage: str, compute: Callable[[], T], record: Callable[[RunContext, T], None] | None = None) -> T:
        """Compute a stage's result, then record it; both timed in `self.timer`, apart. Under a time
        budget, says first where the run stands (the log and a Prefect progress artifact)."""
        if self.budget.time_s is not None:
            fraction, line = self.budget.progress(stage)
            self.logger.info("%s", line)
            self.artifacts.progress("run-progress", fraction, line)
        result = self.timer.run(stage, compute)
        if record is not None:
            with self.timer.recording(stage):
                record(self, result)
        return result

    def describe(self, text: str) -> None:
        """The run's description, shown first on its page in the MLflow UI."""
        self.client.set_tag(self.run_id, DESCRIPTION_TAG, text[:MAX_TAG])

    def scratch_dir(self, name: str) -> Path:
        folder = self.scratch / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def prefect_flow_run_url(flow_run_id: str) -> str:
    """The flow run in Prefect's UI (the configured server's, else a local `prefect server start`)."""
    from prefect.settings import get_current_settings

    base = get_current_settings().ui_url or LOCAL_PREFECT_UI
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


@contextmanager
def open_run(experiment: str, run_name: str | None, tags: Mapping[str, str], timer: StageTimer | None = None,
             background: bool = False) -> Iterator[RunContext]:
    """A parent run, always closed (FINISHED, FAILED, KILLED), with a scratch folder that goes with it.
    Inside a Prefect flow run, the run is tagged with it, links back to it, and artifacts go to Prefect.
    `background`: deferred writes go to a recorder process, which finishes before the run closes."""
    from prefect.context import FlowRunContext

    flow_context = FlowRunContext.get()
    flow_run = flow_context.flow_run if flow_context else None
    if flow_run is not None:
        tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name,
                "prefect.flow_run_url": prefect_flow_run_url(str(flow_run.id)), **tags}
    tags = {**process_owner(), **tags}  # lets a later run tell that this one crashed (tasks/recovery.py)
    client = mlflow_client()
    experiment_id = ensure_experiment(client, experiment)
    name = run_name or (flow_run.name if flow_run else None)
    with parent_run(client, experiment_id, name, tags) as run_id, \
            tempfile.TemporaryDirectory(dir=maas_home(), prefix="run-") as scratch:
        ctx = RunContext(client, run_id, experiment_id, Path(scratch), timer or StageTimer(),
                         Artifacts(to_prefect=flow_run is not None),
                         str(flow_run.id) if flow_run else None, flow_run.name if flow_run else None,
                         Recorder(tracking_uri()) if background else None)
        try:
            if flow_run is not None:
                ctx.artifacts.link("mlflow-run", ctx.url, f"MLflow run {run_id}")
            yield ctx
        finally:
            if ctx.recorder is not None:  # its jobs write files from the scratch folder and runs under this one
                with ctx.timer.recording("waiting for the recorder"):
                    failures = ctx.recorder.close()
                for failure in failures:
                    ctx.logger.warning("recording failed: %s", failure)
