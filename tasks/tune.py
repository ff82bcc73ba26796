"""Tuning: an Optuna study over the network family's search space, pruned on validation F1.

The study lives in RDB storage (SQLite in MAAS_HOME by default), so a re-run continues it: the
budget counts the study's finished trials, and a trial left RUNNING by a dead process is failed
and retried: at once when its owner's PID is gone (tasks/recovery.py), else by its missing heartbeat. Each trial is an MLflow child run of the pipeline's parent
run, logged through explicit run ids (MLflow's fluent API is not thread-safe; Optuna's MLflow
callback does not nest runs).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from prefect import task
from prefect.cache_policies import NO_CACHE

from maas.budget import rows_for_budget
from maas.config import Range, RunConfig, TuningConfig
from maas.errors import MaasInputError
from maas.paths import maas_home
from maas.processes import process_owner
from maas.studies import open_table_study
from maas.figures import log_study_plots
from maas.locks import sqlite_schema_lock
from maas.tracking import redact_url as redacted  # the storage URL without its password
from maas.run_context import RunContext, run_logger, write_child_run, write_dict
from tasks.data import PreparedData
from tasks.recovery import TRIAL_OWNER_ATTR, fail_trials_of_dead_owners
from tasks.tune_workers import (
    SURPLUS_ATTR, StudyJob, for_study, over_budget, publish_job, spends_budget, trials_one_at_a_time,
)
from tasks.train import EpochRecord, TrainingSettings, epoch_series, spec_for_data, train_on_data

DIRECTIONS = {"f1_macro": "maximize", "size": "minimize", "latency": "minimize"}
OBJECTIVE_METRICS = {"f1_macro": "objective/val_f1_macro", "size": "objective/size_bytes", "latency": "objective/latency_ms_b1"}


# --- search space ------------------------------------------------------------------------------


def suggest_hyperparameters(trial: optuna.Trial, family: str, tuning: TuningConfig) -> dict[str, Any]:
    """Every suggest_* call of the study, in one place."""
    space = tuning.mlp if family == "mlp" else tuning.cnn
    params = {
        "lr": trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        "weight_decay": trial.suggest_float(
            "weight_decay", space.weight_decay.low, space.weight_decay.high, log=space.weight_decay.log
        ),
        "dropout": trial.suggest_float("dropout", space.dropout.low, space.dropout.high, log=space.dropout.log),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
        "width": trial.suggest_categorical("width", space.width),
    }
    if family == "mlp":
        params["depth"] = trial.suggest_categorical("depth", space.depth)
    else:
        params["channels"] = trial.suggest_categorical("channels", space.channels)
    return params


def grid_space(family: str, tuning: TuningConfig) -> dict[str, list]:
    """The same space as finite value lists, for the grid sampler."""

    def points(bounds: Range) -> list[float]:
        spread = np.geomspace if bounds.log else np.linspace
        return [float(v) for v in spread(bounds.low, bounds.high, tuning.grid_points)]

    space = tuning.mlp if family == "mlp" else tuning.cnn
    grid = {
        "lr": points(space.lr), "weight_decay": points(space.weight_decay), "dropout": points(space.dropout),
        "batch_size": list(space.batch_size), "width": list(space.width),
    }
    grid["depth" if family == "mlp" else "channels"] = list(space.depth if family == "mlp" else space.channels)
    return grid


BASELINE_ATTR = "maas.baseline"  # marks the trial of the configured settings
FIRST_TRIAL_MIN_S = 1.0  # what a study left without time by its own opening still gives its first trial


def baseline_hyperparameters(settings: TrainingSettings, family: str, tuning: TuningConfig) -> dict[str, Any]:
    """The configured (untuned) settings as trial params, those that lie inside the search space.

    A new study runs them first, so tuning starts from the defaults and can only improve on them.
    """
    space = tuning.mlp if family == "mlp" else tuning.cnn
    model, train = settings.model, settings.train
    candidate: dict[str, Any] = {
        "lr": train.lr, "weight_decay": train.weight_decay, "dropout": model.dropout,
        "batch_size": train.batch_size, "width": model.hidden_sizes[0],
    }
    if family == "mlp":
        candidate["depth"] = len(model.hidden_sizes)
    else:
        candidate["channels"] = model.cnn_channels[0]
    inside = {}
    for name, value in candidate.items():
        bounds = getattr(space, name)
        fits = bounds.low <= value <= bounds.high if isinstance(bounds, Range) else value in bounds
        if fits:
            inside[name] = value
    return inside


def apply_hyperparameters(settings: TrainingSettings, params: dict[str, Any]) -> TrainingSettings:
    """The settings with a trial's hyperparameters in place."""
    shape: dict[str, Any] = {"dropout": params["dropout"]}
    if "depth" in params:
        shape["hidden_sizes"] = [params["width"]] * params["depth"]
    else:
        shape["hidden_sizes"] = [params["width"]]
        shape["cnn_channels"] = [params["channels"], 2 * params["channels"]]
    optimiser = {key: params[key] for key in ("lr", "weight_decay", "batch_size")}
    return TrainingSettings(settings.model.model_copy(update=shape), settings.train.model_copy(update=optimiser))


def chosen_settings(config: RunConfig, tuning: TuningResult | None) -> TrainingSettings:
    """What the final training uses: tuning's best trial past the min_gain_se guard, else the configured settings."""
    configured = TrainingSettings(config.model, config.train)
    return apply_hyperparameters(configured, tuning.best_params) if tuning and tuning.use_tuned else configured


# --- study set-up --------------------------------------------------------------------------------


def storage_url(tuning: TuningConfig) -> str:
    return tuning.storage or f"sqlite:///{maas_home() / 'optuna.db'}"


def ready_storage(tuning: TuningConfig) -> TuningConfig:
    """`tuning` with its storage named by URL (with_storage_url) and the storage's schema made (1.3 s
    on SQLite the first time); raises as open_storage does."""
    resolved = with_storage_url(tuning)
    open_storage(resolved).engine.dispose()
    return resolved


def with_storage_url(tuning: TuningConfig) -> TuningConfig:
    """`tuning` naming its storage by URL, so that a process with another MAAS_HOME opens the same."""
    return tuning.model_copy(update={"storage": storage_url(tuning)})


def same_storage(one: TuningConfig, other: TuningConfig) -> bool:
    """Whether a storage opened for `one` serves `other`: the same URL and heartbeat settings."""
    def key(tuning: TuningConfig) -> tuple:
        return storage_url(tuning), tuning.heartbeat_interval_s, tuning.grace_period_s, tuning.max_retry

    return key(one) == key(other)


def open_storage(tuning: TuningConfig) -> optuna.storages.RDBStorage:
    url = storage_url(tuning)
    # SQLite serialises writers; parallel trials wait for the lock instead of failing on it.
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        # heartbeats are "experimental" in Optuna, and we rely on them
        with sqlite_schema_lock(url), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=tuning.heartbeat_interval_s,
                grace_period=heartbeat_grace_s(tuning),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=tuning.max_retry),
            )
    except Exception as exc:
        raise MaasInputError(f"tuning.storage: cannot open {redacted(url)} ({exc.__class__.__name__})") from None
    if url.startswith("sqlite"):
        write_ahead(storage.engine)
    return storage


def write_ahead(engine) -> None:
    """SQLite in write-ahead mode, synced at checkpoints: every epoch's report is a commit, which in
    the default mode cost an fsync (a fifth of a breast_cancer study's time here), and processes
    sharing the study read while one writes. A killed process loses nothing committed; a power loss
    may lose the last commits, never the file, and the study recovers its trials as after any crash."""
    from sqlalchemy import event

    def on_connect(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections made while Optuna set up the storage are reopened with the pragmas


def make_sampler(tuning: TuningConfig, family: str, seed: int) -> optuna.samplers.BaseSampler:
    if tuning.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(family, tuning), seed=seed)
    if tuning.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(tuning: TuningConfig) -> optuna.pruners.BasePruner:
    if tuning.pruner == "none" or len(tuning.objectives) > 1:  # Optuna prunes single-objective only
        return optuna.pruners.NopPruner()
    if tuning.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=3, max_resource=tuning.max_epochs, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)


def open_study(tuning: TuningConfig, study_name: str, family: str, seed: int, fingerprint: str) -> optuna.Study:
    """The study of this table's trials (maas.studies.open_table_study: study_name, or a name of its own
    for a table other than the one study_name's trials were scored on)."""
    try:
        return open_table_study(
            open_storage(tuning), study_name, fingerprint,
            sampler=make_sampler(tuning, family, seed),
            pruner=make_pruner(tuning),
            directions=[DIRECTIONS[name] for name in tuning.objectives],
        )
    except ValueError as exc:  # e.g. an existing study with other directions
        raise MaasInputError(f"tuning: study '{study_name}' cannot be continued ({exc}); set tuning.study_name") from None


# --- trials ----------------------------------------------------------------------------------------


class TrialTracker:
    """Each finished trial as an MLflow child run of the pipeline's parent run, with its params,
    per-epoch curves, objective values and state; written by the recorder, when the trial ends
    (as Optuna's own MLflow callback does), so a trial does not wait for MLflow."""

    def __init__(self, ctx: RunContext, study_name: str):
        self.ctx, self.study_name = ctx, study_name

    def finish(self, number: int, note: str, params: dict[str, Any], state: str, metrics: dict[str, float],
               history: list[EpochRecord]) -> None:
        with self.ctx.timer.recording("tune"):
            tags = {"optuna.study": self.study_name, "optuna.trial_number": str(number), "optuna.state": state,
                    **({"optuna.note": note[:500]} if note else {})}
            series = [(step, {name: values[name] for name in ("train/loss", "val/loss", "val/f1_macro")})
                      for step, values in epoch_series(history)]
            figures = {"params": params, "metrics": metrics, "series": series}
            self.ctx.defer(write_child_run, self.ctx.ref, f"trial-{number}", tags, figures, (),
                           "FAILED" if state == "failed" else "FINISHED")


def torch_latency_ms(network: torch.nn.Module, n_features: int, repeats: int = 50) -> float:
    """Median batch-1 forward time on CPU, a cheap per-trial latency objective."""
    sample = torch.zeros(1, n_features)
    timings = []
    with torch.no_grad():
        for index in range(repeats + 5):
            started = time.perf_counter()
            network(sample)
            if index >= 5:
                timings.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings))


class Objective:
    """One trial: suggest, train with per-epoch pruning, return the objective values."""

    def __init__(self, prepared: PreparedData, settings: TrainingSettings, tuning: TuningConfig, seed: int,
                 tracker: TrialTracker | None = None):
        self.prepared, self.settings, self.tuning, self.seed, self.tracker = prepared, settings, tuning, seed, tracker
        self.n_features = prepared.arrays.x_train.shape[1]
        self.family = spec_for_data(settings.model, prepared).family
        self.single_objective = len(tuning.objectives) == 1
        # Optuna stores each report as a commit (milliseconds each, a third of a short epoch): only a
        # pruner reads them; each trial's curves are on its child run either way.
        self.reports = self.single_objective and tuning.pruner != "none"
        self.owner = json.dumps(process_owner())
        # the study's end (time.time()): a trial still training then stops at its best epoch so far, as
        # a network does at train.max_seconds. Optuna's timeout only starts no new trial, and one trial
        # on 20,000 rows ran 44 s past a 21 s study.
        self.stop_at = math.inf

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        # Who trains this trial: if we die, the next run fails it at once (tasks/recovery.py), not
        # after Optuna's heartbeat grace period.
        trial.set_user_attr(TRIAL_OWNER_ATTR, self.owner)
        if self.tuning.in_processes and over_budget(trial, self.tuning.n_trials):
            # pruned, not failed: no traceback in the log, and TPE skips a trial that has no params
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned("surplus: another process took the study's last trial first")
        params = suggest_hyperparameters(trial, self.family, self.tuning)
        settings = apply_hyperparameters(self.settings, params)
        settings = TrainingSettings(settings.model, settings.train.model_copy(
            update={"max_epochs": self.tuning.max_epochs, "patience": self.tuning.patience,
                    "max_seconds": self.seconds_left(settings.train.max_seconds)}))
        history: list[EpochRecord] = []

        def report(record: EpochRecord) -> None:
            history.append(record)
            if self.reports:
                trial.report(record.val_f1_macro, record.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")

        state, values = "failed", None
        try:
            result = train_on_data(self.prepared, settings, self.seed, on_epoch=report)
            objective = {
                "f1_macro": result.best.val_f1_macro,
                "size": 4.0 * sum(p.numel() for p in result.network.parameters()),
                "latency": torch_latency_ms(result.network, self.n_features) if "latency" in self.tuning.objectives else 0.0,
            }
            values = tuple(objective[name] for name in self.tuning.objectives)
            trial.set_user_attr("val_loss", result.best.val_loss)
            state = "complete"
            return values[0] if self.single_objective else values
        except optuna.TrialPruned as pruned:
            state = "pruned"
            trial.set_user_attr("note", str(pruned))
            raise
        except Exception as error:
            note = f"{error.__class__.__name__}: {error}"
            trial.set_user_attr("error", note[:300])
            trial.set_user_attr("note", note[:500])
            raise
        finally:
            trial.set_user_attr("epochs", len(history))
            if self.tracker:
                final = {OBJECTIVE_METRICS[name]: value for name, value in zip(self.tuning.objectives, values)} if values else {}
                self.tracker.finish(trial.number, trial.user_attrs.get("note", ""), params, state,
                                    {**final, "epochs": len(history)}, history)

    def seconds_left(self, configured: float | None) -> float | None:
        """A trial's train.max_seconds: the configured limit, cut to the study's time left (at least a second)."""
        if math.isinf(self.stop_at):
            return configured
        left = max(1.0, self.stop_at - time.time())
        return left if configured is None else min(configured, left)


class TrialClock:
    """After the first trial and every fifth: how long a trial takes and how long the study has left,
    so a user knows early whether tuning is a minute or an hour."""

    def __init__(self, n_trials: int | None, deadline: float):
        self.n_trials, self.deadline, self.started, self.done = n_trials, deadline, time.perf_counter(), 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        if self.done != 1 and self.done % 5:
            return
        each = (time.perf_counter() - self.started) / self.done
        left = each * max(0, self.n_trials - self.done) if self.n_trials else math.inf
        left = min(left, max(0.0, self.deadline - time.perf_counter()))
        run_logger().info("tuning: %d trial(s) in %.0f s, ~%.1f s each; ~%s left", self.done,
                          time.perf_counter() - self.started, each, "?" if math.isinf(left) else f"{left:.0f} s")


class FailureGuard:
    """Stops the study after too many failed trials in a row (a broken space, not bad luck)."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.streak = self.streak + 1 if trial.state == TrialState.FAIL else 0
        if self.streak >= self.limit:
            study.stop()


# --- the study -------------------------------------------------------------------------------------


@dataclass
class TuningResult:
    study_name: str
    storage: str  # redacted
    objectives: list[str]
    best_params: dict[str, Any]
    best_values: list[float]
    best_trial: int
    n_complete: int
    n_pruned: int
    n_failed: int
    epochs_total: int
    reproducible: bool
    pareto_front: list[dict[str, Any]] = field(default_factory=list)
    top_trials: list[dict[str, Any]] = field(default_factory=list)
    baseline_value: float | None = None
    use_tuned: bool = True  # False: the configured settings stay (the best trial is not clearly better)
    decision: str = ""
    storage_url: str = field(default="", repr=False)  # unredacted, for reading the study back (plots); never logged
    trial_rows: int = 0  # training rows each trial saw (a stratified sample on large tables: tuning.sample_rows)
    training_rows: int = 0  # training rows the final network trains on


def tuned_or_default(best: FrozenTrial, baseline: FrozenTrial | None, n_val: int, min_gain_se: float) -> tuple[bool, str]:
    """Take the best trial only when it beats the baseline (the configured settings) on validation
    F1 by more than min_gain_se standard errors. The best of many trials on a small validation
    split is flattered by noise (the winner's curse); swapping the defaults for it cost test F1 on
    every built-in dataset here, while the gains it found were within ~1.4 SE."""
    if baseline is None or not baseline.values:
        return True, f"trial {best.number} (no baseline trial to compare with)"
    if best.number == baseline.number:
        return False, "the baseline trial (the configured settings) is the best"
    value = baseline.values[0]
    standard_error = max(math.sqrt(value * (1 - value) / max(1, n_val)), 1 / max(1, n_val))
    gain = best.values[0] - value
    verdict = (f"trial {best.number}'s val F1 {best.values[0]:.4f} vs the baseline's {value:.4f}: "
               f"+{gain:.4f} = {gain / standard_error:.1f} SE on {n_val} validation rows")
    if gain > min_gain_se * standard_error:
        return True, f"{verdict} > {min_gain_se:g}: tuned settings used"
    return False, f"{verdict}, not above {min_gain_se:g}: configured settings kept"


def pick_pareto_trial(front: list[FrozenTrial], objectives: list[str], pick: str, tolerance: float) -> FrozenTrial:
    """Among Pareto-optimal trials within `tolerance` F1 of the best, the one the policy prefers."""
    best_quality = max(t.values[0] for t in front)
    candidates = [t for t in front if t.values[0] >= best_quality - tolerance]
    preferred = {"fastest": ["latency", "size"], "smallest": ["size", "latency"]}.get(pick, [])
    key = next((name for name in preferred if name in objectives), None)
    if key is None:
        return max(candidates, key=lambda t: t.values[0])
    index = objectives.index(key)
    return min(candidates, key=lambda t: (t.values[index], -t.values[0]))


def summarise(study: optuna.Study, tuning: TuningConfig, n_val: int) -> TuningResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        failures = [t.user_attrs.get("error") for t in trials if t.state == TrialState.FAIL]
        raise RuntimeError(
            f"tuning: no trial of study '{study.study_name}' completed ({len(trials)} tried); "
            f"check the search space and train settings{f' (first failure: {failures[0]})' if failures and failures[0] else ''}"
        )
    if len(tuning.objectives) == 1:
        best = study.best_trial
        front: list[FrozenTrial] = [best]
    else:
        front = study.best_trials
        best = pick_pareto_trial(front, tuning.objectives, tuning.pareto_pick, tuning.quality_tolerance)
    ranked = sorted(complete, key=lambda t: -t.values[0])[:10]
    baseline = next((t for t in complete if t.user_attrs.get(BASELINE_ATTR)), None)
    if len(tuning.objectives) == 1:
        use_tuned, decision = tuned_or_default(best, baseline, n_val, tuning.min_gain_se)
    else:
        use_tuned, decision = True, f"Pareto pick: trial {best.number}"
    return TuningResult(
        study_name=study.study_name,
        storage=redacted(storage_url(tuning)),
        objectives=list(tuning.objectives),
        best_params=dict(best.params),
        best_values=list(best.values),
        best_trial=best.number,
        n_complete=len(complete),
        n_pruned=sum(t.state == TrialState.PRUNED and spends_budget(t) for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        epochs_total=sum(int(t.user_attrs.get("epochs", 0)) for t in trials),
        reproducible=tuning.n_jobs == 1 and not tuning.in_processes,
        pareto_front=[{"trial": t.number, "values": list(t.values), "params": t.params} for t in front],
        top_trials=[{"trial": t.number, **{name: round(v, 5) for name, v in zip(tuning.objectives, t.values)},
                     "epochs": t.user_attrs.get("epochs"), **t.params} for t in ranked],
        baseline_value=baseline.values[0] if baseline is not None and baseline.values else None,
        use_tuned=use_tuned,
        decision=decision,
        storage_url=storage_url(tuning),
    )


def run_study(objective: Objective, tuning: TuningConfig, study_name: str, seed: int) -> TuningResult:
    """Run trials until the study holds tuning.n_trials finished ones (or timeout_s passes)."""
    started = time.perf_counter()
    study = open_study(tuning, study_name, objective.family, seed, objective.prepared.fingerprint)
    recovered = fail_trials_of_dead_owners(study, tuning.max_retry)
    if recovered:
        run_logger().warning("recovered from a crash: Optuna trial(s) %s of a dead process failed and re-queued",
                             ", ".join(recovered))
    if not study.trials and tuning.sampler != "grid":
        study.enqueue_trial(baseline_hyperparameters(objective.settings, objective.family, tuning),
                            user_attrs={BASELINE_ATTR: True})
    deadline = started + tuning.timeout_s if tuning.timeout_s else math.inf
    guard = FailureGuard(tuning.max_failures)
    finished_before = sum(spends_budget(t) for t in study.get_trials(deepcopy=False))
    if not finished_before:
        # Opening the study counts against its time, yet a study without a finished trial keeps at
        # least a second for its first (which trains at least an epoch): on busy cores, opening a new
        # SQLite study once took all of a 1 s study's time, and the run failed for want of a trial.
        deadline = max(deadline, time.perf_counter() + FIRST_TRIAL_MIN_S)
    clock = TrialClock(None if tuning.n_trials is None else tuning.n_trials - finished_before, deadline)
    threads = torch.get_num_threads()
    if tuning.n_jobs > 1 or tuning.workers > 1:  # parallel trials share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(tuning.n_jobs, tuning.workers)))
    try:
        if tuning.in_processes:
            trials_in_processes(study, objective, study_name, deadline, [guard, clock])
            return summarise(study, tuning, len(objective.prepared.splits.y_val))
        objective.stop_at = time.time() + (deadline - time.perf_counter())  # trials_one_at_a_time sets it in processes
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            while True:
                trials = study.get_trials(deepcopy=False)
                finished = sum(spends_budget(t) for t in trials)
                remaining = None if tuning.n_trials is None else tuning.n_trials - finished
                time_left = deadline - time.perf_counter()
                if (remaining is not None and remaining <= 0) or time_left <= 0 or guard.streak >= guard.limit:
                    break
                # Enqueued trials (the baseline, retries of dead ones) run one at a time: Optuna's RDB
                # storage can hand the same waiting trial to two threads, and the second tell fails.
                waiting = sum(t.state == TrialState.WAITING for t in trials)
                serial_first = waiting > 0 and tuning.n_jobs > 1
                batch = (waiting if remaining is None else min(waiting, remaining)) if serial_first else remaining
                study.optimize(
                    objective, n_trials=batch, timeout=None if math.isinf(time_left) else time_left,
                    n_jobs=1 if serial_first else tuning.n_jobs, catch=(Exception,), callbacks=[guard, clock],
                    gc_after_trial=False, show_progress_bar=False,
                )
                if remaining is None and not serial_first:
                    break
    finally:
        torch.set_num_threads(threads)
    return summarise(study, tuning, len(objective.prepared.splits.y_val))


def heartbeat_grace_s(tuning: TuningConfig) -> float:
    """How long a RUNNING trial may go without a sign of life (Optuna's grace period)."""
    return tuning.grace_period_s or 2 * tuning.heartbeat_interval_s


def trials_in_processes(study: optuna.Study, objective: Objective, study_name: str, deadline: float,
                        callbacks: list) -> None:
    """tuning.workers processes on the study (tasks/tune_workers.py): this one, which also takes the
    enqueued trials, writes every trial's child run and settles the trials of a worker that died."""
    tuning = objective.tuning
    wall_deadline = time.time() + (deadline - time.perf_counter()) if not math.isinf(deadline) else math.inf
    same_study = with_storage_url(tuning)  # the study is open: no schema to make
    job = StudyJob(objective.prepared, objective.settings, same_study, objective.seed, study_name, wall_deadline)
    if tuning.remote_workers:
        publish_job(study, job, objective.tracker.ctx.ref if objective.tracker else None)
    workers = for_study(job)

    def between() -> None:
        workers.drain(objective.tracker)
        if tuning.remote_workers:  # a remote worker's death shows only as its trial's missing heartbeat
            with warnings.catch_warnings():  # Optuna marks it experimental; a run with remote workers printed so
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        dead = workers.dead()
        if dead or tuning.remote_workers:  # a remote worker killed before its trial's owner was set
            recovered = fail_trials_of_dead_owners(study, tuning.max_retry, heartbeat_grace_s(tuning))
            if recovered:
                run_logger().warning("tuning: a worker died (%s); its trial(s) %s failed and re-queued",
                                     ", ".join(dead) or "a remote worker", ", ".join(recovered))

    try:
        trials_one_at_a_time(study, objective, wall_deadline, callbacks, take_waiting=True, between=between)
    finally:
        dead = workers.close(objective.tracker, study)
    if dead:
        run_logger().warning("tuning: worker process(es) ended abnormally: %s", ", ".join(dead))


def tune(prepared: PreparedData, settings: TrainingSettings, tuning: TuningConfig, seed: int, study_name: str,
         tracker: TrialTracker | None = None) -> TuningResult:
    """The tuning stage: an Optuna study over the family's search space, starting from `settings`."""
    if tuning.n_jobs > 1 or tuning.in_processes:
        run_logger().warning("tuning.%s: trials run in parallel, so the sampler's seed no longer fixes which trials "
                             "run; results are not reproducible run to run",
                             f"n_jobs={tuning.n_jobs}" if tuning.n_jobs > 1 else
                             f"workers={tuning.workers}" if tuning.workers > 1 else "remote_workers")
    # The sample follows the run's budget (rows_for_budget), but the study is the table's (its fingerprint):
    # a rerun under another budget continues it with trials on another sample size, all scored on the same
    # validation rows. Keying the study by sample size too would need `maas tune-worker`, which finds the
    # study by the table before it reads the run's tuning settings, to find it another way.
    trial_data = prepared.with_training_sample(tuning.sample_rows, seed)
    if trial_data is not prepared:  # trial cost stops growing with the table; the final training uses every row
        run_logger().info("trials train on a stratified sample of %d of the %d training rows "
                          "(tuning.sample_rows, scaled to the budget)",
                          len(trial_data.splits.y_train), len(prepared.splits.y_train))
    result = run_study(Objective(trial_data, settings, tuning, seed, tracker), tuning, study_name, seed)
    result.trial_rows, result.training_rows = len(trial_data.splits.y_train), len(prepared.splits.y_train)
    return result


def record_tuning(ctx: RunContext, result: TuningResult) -> None:
    """The study's outcome on the parent run (params, metrics, the decision), its plots, and the top
    trials as a Prefect table."""
    ctx.logger.info(
        "study '%s': %d complete, %d pruned, %d failed, %d epochs; best trial %d %s = %s",
        result.study_name, result.n_complete, result.n_pruned, result.n_failed, result.epochs_total,
        result.best_trial, "/".join(result.objectives), ", ".join(f"{v:.4f}" for v in result.best_values),
    )
    ctx.logger.info("tuning decision: %s", result.decision)
    ctx.record(
        params={"tuning.storage_redacted": result.storage, "tuning.study": result.study_name,
                **{f"best.{key}": value for key, value in result.best_params.items()}},
        tags={"maas.tuning_decision": result.decision},
        metrics={"tuning/used_tuned": float(result.use_tuned),
                 **({"tuning/baseline_val_f1_macro": result.baseline_value} if result.baseline_value is not None else {}),
                 "tuning/best_val_f1_macro": result.best_values[0], "tuning/n_complete": result.n_complete,
                 "tuning/n_pruned": result.n_pruned, "tuning/n_failed": result.n_failed,
                 "tuning/epochs_total": result.epochs_total, "tuning/best_trial": result.best_trial},
    )
    ctx.defer(log_study_plots, ctx.run_id, result.storage_url, result.study_name, result.objectives,
              ctx.scratch_dir("tuning"))
    ctx.defer(write_dict, ctx.run_id, {"objectives": result.objectives, "front": result.pareto_front},
              "tuning/pareto_front.json")
    ctx.artifacts.table("tuning-trials", result.top_trials,
                        f"Top trials of study '{result.study_name}' by validation F1")


def budgeted_tuning(tuning: TuningConfig, budget) -> TuningConfig:
    """The study's limits under the run's budget: its timeout is the stage's allotment, and the
    trials' sample grows with a budget above the default."""
    return tuning.model_copy(update={"timeout_s": budget.limit("tune", tuning.timeout_s),
                                     "sample_rows": rows_for_budget(tuning.sample_rows, budget.time_s)})


# --- Prefect wrapper -------------------------------------------------------------------------------


@task(name="tune", retries=0, timeout_seconds=12 * 3600, cache_policy=NO_CACHE)
def tune_task(ctx: RunContext, prepared: PreparedData, config: RunConfig) -> TuningResult:
    """No task retries: the study itself resumes, so a rerun of the flow continues it."""
    study_name = config.tuning.study_name or config.experiment_name
    settings = TrainingSettings(config.model, config.train)
    tracker = TrialTracker(ctx, study_name)
    tuning = budgeted_tuning(config.tuning, ctx.budget)
    result = ctx.run_stage("tune", partial(tune, prepared, settings, tuning, config.seed, study_name, tracker),
                           record_tuning)
    if tuning.timeout_s != config.tuning.timeout_s and result.n_complete + result.n_pruned < (tuning.n_trials or 0):
        ctx.budget.cut("tune", f"{result.n_complete + result.n_pruned} of {tuning.n_trials} trials in {tuning.timeout_s:.0f} s")
        ctx.logger.warning("budget: tuning stopped at %s", ctx.budget.cuts["tune"])
    return result
