"""After a crash: nothing left RUNNING, nothing half-registered.

A `kill -9` (or a power cut) of `maas run` leaves its MLflow parent run RUNNING forever, maybe a
child run the recorder was writing, the Optuna trial it was training RUNNING until a later study
sees its heartbeat stale, its Prefect flow run RUNNING, and, between creating a model version and
pointing the alias at it, a version without its alias. The next `maas run` / `maas monitor` finds
them before it starts and settles each:

- a RUNNING parent run whose owner is gone: KILLED, tagged `maas.crash` with why. Its owner is the
  process in its tags (`maas.host`, `maas.pid`, `maas.process_started`, set by open_run): gone when
  that PID is not running, or runs another program (PIDs are reused). On another host, the run's
  Prefect flow run decides: a flow run in a final state has no live process behind it;
- a RUNNING child run whose parent is not RUNNING: KILLED;
- the dead run's Prefect flow run, still RUNNING: Crashed;
- a RUNNING Optuna trial whose owner (the trial's `maas.owner` attribute) is gone: FAIL, and
  re-queued as Optuna's heartbeat callback would (up to `tuning.max_retry`);
- a model version still tagged `maas.registration=pending` whose run is not RUNNING: finished
  when the alias points at it, deleted otherwise.
Runs and trials without owner tags (a notebook's, an older release's) are never touched.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from maas.processes import PREFECT_FINAL, owner_is_gone
from maas.run_context import StageTimer, run_logger
from maas.tracking import mlflow_client

REGISTRATION_TAG = "maas.registration"  # 'pending' from the version's creation until its alias is set
TRIAL_OWNER_ATTR = "maas.owner"  # an Optuna trial's user attribute: the process training it

CRASH_TAG = "maas.crash"


@dataclass
class Recovery:
    """What was settled, for one line in the log and the tests."""

    killed_runs: list[str] = field(default_factory=list)  # "run <id> (<name>): <why>"
    crashed_flow_runs: list[str] = field(default_factory=list)
    failed_trials: list[str] = field(default_factory=list)  # "<study> #<number>"
    finished_versions: list[str] = field(default_factory=list)  # "name/version"
    deleted_versions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.killed_runs, self.crashed_flow_runs, self.failed_trials, self.finished_versions,
                    self.deleted_versions))

    def line(self) -> str:
        parts = []
        if self.killed_runs:
            parts.append(f"{len(self.killed_runs)} MLflow run(s) left RUNNING marked KILLED ({'; '.join(self.killed_runs[:3])})")
        if self.crashed_flow_runs:
            parts.append(f"{len(self.crashed_flow_runs)} Prefect flow run(s) marked Crashed")
        if self.failed_trials:
            parts.append(f"Optuna trial(s) {', '.join(self.failed_trials)} failed and re-queued")
        if self.finished_versions:
            parts.append(f"version(s) {', '.join(self.finished_versions)} finished (alias already set)")
        if self.deleted_versions:
            parts.append(f"half-registered version(s) {', '.join(self.deleted_versions)} deleted")
        return "recovered from a crash: " + "; ".join(parts)


# --- MLflow runs -----------------------------------------------------------------------------------


def running_runs(client) -> list:
    from mlflow.entities import ViewType

    experiments = [experiment.experiment_id for experiment in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    runs = []
    for start in range(0, len(experiments), 100):  # search_runs takes at most 100 experiments
        token = None
        while True:
            page = client.search_runs(experiments[start:start + 100], "attributes.status = 'RUNNING'",
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def kill_runs_of_dead_owners(client, running: list, prefect_states: dict[str, str], recovery: Recovery) -> list:
    """Parent runs first (owner tags), then child runs whose parent is no longer RUNNING. Returns the
    killed runs."""
    killed = []
    for run in running:
        tags = run.data.tags
        why = owner_is_gone(tags, prefect_states.get(tags.get("prefect.flow_run_id", "")))
        if why:
            kill_run(client, run, why)
            killed.append(run)
            recovery.killed_runs.append(f"{run.info.run_name or run.info.run_id}: {why}")
    still_running = {run.info.run_id for run in running} - {run.info.run_id for run in killed}
    for run in running:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and run.info.run_id in still_running and parent not in still_running:
            kill_run(client, run, f"its parent run {parent} is not running")
            killed.append(run)
            recovery.killed_runs.append(f"{run.info.run_name or run.info.run_id}: child of a dead run")
    return killed


def kill_run(client, run, why: str) -> None:
    client.set_tag(run.info.run_id, CRASH_TAG, f"marked KILLED by a later run on {socket.gethostname()} "
                                               f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {why}")
    client.set_terminated(run.info.run_id, status="KILLED")
    fail_pending_logged_models(client, run)


def fail_pending_logged_models(client, run) -> None:
    """A model being logged when the run died stays PENDING in MLflow 3's logged-model list."""
    try:
        models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    except Exception:  # noqa: BLE001 - a store without logged models (older server): nothing to settle
        return
    for model in models:
        if str(model.status) in ("PENDING", "LoggedModelStatus.PENDING"):
            client.finalize_logged_model(model.model_id, "FAILED")


# --- Prefect flow runs -----------------------------------------------------------------------------


def prefect_flow_run_states(flow_run_ids: list[str]) -> dict[str, str]:
    """flow run id -> its state type, for those the current Prefect API knows; {} without an API."""
    if not flow_run_ids:
        return {}
    try:
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        return {str(run.id): run.state.type.value for run in found if run.state is not None}
    except Exception:  # noqa: BLE001 - no Prefect API reachable: the process check alone decides
        return {}


def crash_flow_runs(killed: list, prefect_states: dict[str, str], recovery: Recovery) -> None:
    """Mark the dead runs' Prefect flow runs Crashed, where Prefect still shows them running."""
    for run in killed:
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        if not flow_run_id or prefect_states.get(flow_run_id) in PREFECT_FINAL | {None}:
            continue
        try:
            from prefect import get_client
            from prefect.states import Crashed

            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run_id, Crashed(message=run.data.tags.get(CRASH_TAG, "process gone")),
                                          force=True)
            recovery.crashed_flow_runs.append(flow_run_id)
        except Exception:  # noqa: BLE001 - the MLflow side is what must be right; Prefect is best effort
            continue


# --- Optuna trials ---------------------------------------------------------------------------------


def fail_trials_of_dead_owners(study, max_retry: int, unowned_after_s: float | None = None) -> list[str]:
    """The study's RUNNING trials whose owner (the objective's `maas.owner` attribute) is gone, and
    with `unowned_after_s`, those started longer ago that never got an owner: FAIL, then re-queued as
    Optuna's heartbeat callback would. Returns '<study> #<number>' of each.

    A worker killed between Optuna creating its trial and the objective's first line leaves a
    trial with no owner and no heartbeat row, which Optuna's stale-trial check skips: the run
    waited on it forever (seen once in CI, a test's SIGKILL landing in that window)."""
    import datetime

    import optuna
    from optuna.trial import TrialState

    failed = []
    storage = study._storage
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        raw_owner = trial.user_attrs.get(TRIAL_OWNER_ATTR)
        if raw_owner:
            gone = owner_is_gone(json.loads(raw_owner))
        else:
            gone = (unowned_after_s is not None and trial.datetime_start is not None
                    and (now - trial.datetime_start).total_seconds() > unowned_after_s)
        if not gone:
            continue
        if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):  # False: settled by another process
            with warnings.catch_warnings():  # "experimental" in Optuna; the same callback its heartbeat uses
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
            retry(study, storage.get_trial(trial._trial_id))
            failed.append(f"{study.study_name} #{trial.number}")
    return failed


# --- registry --------------------------------------------------------------------------------------


def settle_pending_versions(client, recovery: Recovery) -> None:
    """Versions whose registration did not finish, of runs no longer RUNNING."""
    from mlflow.exceptions import MlflowException

    for version in client.search_model_versions(f"tags.`{REGISTRATION_TAG}` = 'pending'"):
        try:
            run_status = client.get_run(version.run_id).info.status if version.run_id else "FINISHED"
        except MlflowException:
            run_status = "DELETED"
        if run_status == "RUNNING":
            continue  # still being registered
        label = f"{version.name}/{version.version}"
        if client.get_model_version(version.name, version.version).aliases:  # search leaves aliases out
            client.set_model_version_tag(version.name, version.version, REGISTRATION_TAG, "complete")
            recovery.finished_versions.append(label)
        else:
            client.delete_model_version(version.name, version.version)
            recovery.deleted_versions.append(label)


# --- the stage -------------------------------------------------------------------------------------


def recover(client) -> Recovery:
    """Settle what crashed runs left in MLflow, Prefect and the registry (see the module docstring);
    safe beside live runs, whose owners are alive. Optuna's trials are settled by the tune stage,
    which has the study open."""
    recovery = Recovery()
    running = running_runs(client)
    prefect_states = prefect_flow_run_states(sorted({run.data.tags["prefect.flow_run_id"] for run in running
                                                     if "prefect.flow_run_id" in run.data.tags}))
    killed = kill_runs_of_dead_owners(client, running, prefect_states, recovery)
    crash_flow_runs(killed, prefect_states, recovery)
    settle_pending_versions(client, recovery)
    return recovery


def report_recovery(recovery: Recovery) -> Recovery:
    if recovery:
        run_logger().warning(recovery.line())
    return recovery


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="recover", retries=1, retry_delay_seconds=2, timeout_seconds=300, cache_policy=NO_CACHE)
def recover_task(timer: StageTimer | None = None) -> Recovery:
    """First in both flows: a crashed run is settled before this one starts (one line if any was)."""
    timer = timer or StageTimer()
    return report_recovery(timer.run("recover", recover, mlflow_client()))
