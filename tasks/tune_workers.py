"""Tuning across processes (tuning.workers = N): the run's own process and N-1 worker processes
started beside it run trials of one Optuna study in its RDB storage (SQLite by default, PostgreSQL
for a team). Threads (tuning.n_jobs) share one interpreter lock and gained 1.33x on 2 cores;
processes train side by side.

Each process runs one trial at a time and, before it starts one, counts the study's trials, so
together they stop at tuning.n_trials finished ones (or the deadline). Enqueued trials (the baseline,
retries of a dead process's trials) are left to the run's process: Optuna's storage could hand one
waiting trial to two takers. A worker killed mid-trial leaves its trial RUNNING; the run's process
sees the owner's PID gone, fails it and re-queues it (tasks/recovery.py), or Optuna's heartbeat does.
Workers send each finished trial's record back on a queue: the run's process writes it as an
MLflow child run, as it does its own trials.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue as queues
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

WAIT_S = 0.5  # between looks at the study while other processes' trials run
JOIN_GRACE_S = 600  # a worker's trial running at the deadline is let finish, up to this


def next_trial_allowed(study: optuna.Study, n_trials: int | None, take_waiting: bool) -> bool | None:
    """True: start a trial now; False: wait (others' trials would fill the budget, or a waiting trial
    is the run's process's to take); None: the study holds its n_trials finished trials."""
    states = Counter(trial.state for trial in study.get_trials(deepcopy=False))
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    if n_trials is not None and finished >= n_trials:
        return None
    if n_trials is not None and finished + states[TrialState.RUNNING] >= n_trials:
        return False
    return take_waiting or not states[TrialState.WAITING]


def trials_one_at_a_time(study: optuna.Study, objective, deadline: float, callbacks: list, take_waiting: bool,
                         between: Callable[[], None] = lambda: None) -> None:
    """Run trials of `study` one by one until it holds objective.tuning.n_trials finished ones,
    `deadline` (time.time()) passes or a failure guard among `callbacks` has seen too many failures
    in a row; `between()` after each trial and each wait."""
    n_trials = objective.tuning.n_trials

    def failing() -> bool:
        return any(getattr(callback, "streak", 0) >= getattr(callback, "limit", math.inf) for callback in callbacks)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        while time.time() < deadline and not failing():
            allowed = next_trial_allowed(study, n_trials, take_waiting)
            if allowed is None:
                return
            if allowed:
                study.optimize(objective, n_trials=1, timeout=None if math.isinf(deadline) else deadline - time.time(),
                               catch=(Exception,), callbacks=callbacks, gc_after_trial=False, show_progress_bar=False)
            else:
                time.sleep(WAIT_S)
            between()


@dataclass
class StudyJob:
    """What a worker process needs to join the run's study: the trials' data and settings, the study
    (tuning.storage resolved to the run's), and when to stop (time.time())."""

    prepared: Any
    settings: Any
    tuning: Any
    seed: int
    study_name: str
    deadline: float


class QueueTracker:
    """A worker's trial records, sent to the run's process (which writes the MLflow child runs)."""

    def __init__(self, records):
        self.records = records

    def finish(self, *record) -> None:
        self.records.put(record)


def worker_main(index: int, job: StudyJob, records) -> None:
    """A worker process: the run's study loaded from its storage, trials until the budget is met."""
    from tasks.tune import FailureGuard, Objective, make_pruner, make_sampler, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.tuning.workers))
    objective = Objective(job.prepared, job.settings, job.tuning, job.seed, QueueTracker(records))
    study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.tuning),
                              pruner=make_pruner(job.tuning),
                              sampler=make_sampler(job.tuning, objective.family, job.seed + 1000 * index))
    trials_one_at_a_time(study, objective, job.deadline, [FailureGuard(job.tuning.max_failures)], take_waiting=False)


class TuningWorkers:
    """tuning.workers - 1 worker processes (spawned: a forked torch is unsafe) on the study, and the
    queue their trial records come back on."""

    def __init__(self, job: StudyJob):
        context = multiprocessing.get_context("spawn")
        self.records = context.Queue()
        self.stopped: set[int] = set()  # workers close() stopped because they trained nothing
        job.prepared.arrays  # computed once here (text embedded, features built), not again in each worker
        self.processes = [context.Process(target=worker_main, name=f"maas-tune-worker-{index}", daemon=True,
                                          args=(index, job, self.records))
                          for index in range(1, job.tuning.workers)]
        for process in self.processes:
            process.start()

    def drain(self, tracker) -> None:
        """Hand every trial record received so far to the run's tracker."""
        while True:
            try:
                record = self.records.get_nowait()
            except queues.Empty:
                return
            if tracker is not None:
                tracker.finish(*record)

    def dead(self) -> list[str]:
        """Workers that ended abnormally (stopped by close() as idle is normal)."""
        return [f"{process.name} (exit {process.exitcode})" for process in self.processes
                if process.exitcode not in (None, 0) and process.pid not in self.stopped]

    def close(self, tracker, study: optuna.Study) -> list[str]:
        """Wait for the workers' running trials to end, collect their last records; say who died. A
        worker training nothing is stopped at once: one still starting (seconds of imports) would
        otherwise hold the stage up only to find the study done."""
        import json

        from tasks.recovery import TRIAL_OWNER_ATTR

        training = {int(json.loads(trial.user_attrs[TRIAL_OWNER_ATTR])["maas.pid"])
                    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if TRIAL_OWNER_ATTR in trial.user_attrs}
        for process in self.processes:
            if process.is_alive() and process.pid not in training:
                self.stopped.add(process.pid)
                process.terminate()
        deadline = time.monotonic() + JOIN_GRACE_S
        for process in self.processes:
            while process.is_alive() and time.monotonic() < deadline:
                self.drain(tracker)
                process.join(timeout=WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()
        self.drain(tracker)
        return self.dead()
