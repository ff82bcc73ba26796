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

import contextlib
import math
import multiprocessing
import os
import queue as queues
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

WAIT_S = 0.1  # between looks at the study while other processes' trials run (0.5 cost a worker ~4% of a short study)
JOIN_GRACE_S = 600  # a worker's trial running at the deadline is let finish, up to this


SURPLUS_ATTR = "maas.surplus"  # a trial that yielded its slot: started after the budget was claimed


def spends_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """A finished trial that counts toward tuning.n_trials (a surplus one does not)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and not trial.user_attrs.get(SURPLUS_ATTR)


def over_budget(trial: optuna.Trial, n_trials: int | None) -> bool:
    """Whether a trial just started is one too many. Two processes can each see one slot left and
    each start a trial (seeing and starting are not one step); the later-numbered one yields, before
    it trains. Earlier trials that hold a slot: waiting, running, or finished, not failed or surplus."""
    if n_trials is None:
        return False
    earlier = [other for other in trial.study.get_trials(deepcopy=False) if other.number < trial.number]
    holding = sum(other.state in (TrialState.WAITING, TrialState.RUNNING) or spends_budget(other) for other in earlier)
    return holding >= n_trials


def next_trial_allowed(study: optuna.Study, n_trials: int | None, take_waiting: bool) -> bool | None:
    """True: start a trial now; False: wait (others' trials would fill the budget, or a waiting trial
    is the run's process's to take); None: the study holds its n_trials finished trials."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(trial.state for trial in trials)
    finished = sum(spends_budget(trial) for trial in trials)
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
    objective.stop_at = deadline  # a trial still training at the deadline stops there (Objective.seconds_left)

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


def warm_up() -> None:
    """What a first trial would pay before its first epoch: torch's optimizer imports torch._dynamo on
    its first use (2.4 s here)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight])
    weight.sum().backward()
    optimizer.step()


def worker_main(index: int, jobs, records, warm, storage_tuning) -> None:
    """A worker process: imports first (seconds, overlapping the run's start when started ahead), and
    the study storage opened when the run named it (`storage_tuning`); then the study its job names,
    loaded from that storage, trials until the budget is met."""
    from tasks.tune import FailureGuard, Objective, make_pruner, make_sampler, open_storage, same_storage

    warm_up()
    storage = None
    if storage_tuning is not None:
        with contextlib.suppress(Exception):  # the run's process opens it too, and says what is wrong in one line
            storage = open_storage(storage_tuning)  # a fresh process's first open: ~0.5 s here
    warm.release()
    job = jobs.get()
    if storage is None or not same_storage(storage_tuning, job.tuning):
        storage = open_storage(job.tuning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.tuning.workers))
    objective = Objective(job.prepared, job.settings, job.tuning, job.seed, QueueTracker(records))
    study = optuna.load_study(study_name=job.study_name, storage=storage,
                              pruner=make_pruner(job.tuning),
                              sampler=make_sampler(job.tuning, objective.family, job.seed + 1000 * index))
    trials_one_at_a_time(study, objective, job.deadline, [FailureGuard(job.tuning.max_failures)], take_waiting=False)


class TuningWorkers:
    """`count` worker processes (spawned: a forked torch is unsafe), the queue their study job goes out
    on and the queue their trial records come back on. Started ahead of the study (start_ahead), a
    worker's imports (about 6 s here) overlap the run's start instead of the study's first trials."""

    def __init__(self, count: int, storage_tuning=None):
        context = multiprocessing.get_context("spawn")
        self.jobs, self.records = context.Queue(), context.Queue()
        self.warm = context.Semaphore(0)  # released by each worker once imported, warmed up and its storage open
        self.stopped: set[int] = set()  # workers close() stopped because they trained nothing
        self.processes = [context.Process(target=worker_main, name=f"maas-tune-worker-{index}", daemon=True,
                                          args=(index, self.jobs, self.records, self.warm, storage_tuning))
                          for index in range(1, count + 1)]
        for process in self.processes:
            process.start()

    def wait_warm(self, timeout_s: float) -> bool:
        """Whether every worker is ready for a study within timeout_s (tests: trials on both sides)."""
        deadline = time.monotonic() + timeout_s
        return all(self.warm.acquire(timeout=max(0.0, deadline - time.monotonic())) for _ in self.processes)

    def begin(self, job: StudyJob) -> None:
        """Hand every worker the study."""
        job.prepared.arrays  # computed once here (text embedded, features built), not again in each worker
        for _ in self.processes:
            self.jobs.put(job)

    def stop(self) -> None:
        """End workers that never got a study (still importing, or waiting for it)."""
        for process in self.processes:
            process.terminate()
            process.join()

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


_started_ahead: TuningWorkers | None = None  # at most one set, taken by the run's study


def start_ahead(count: int, tuning=None) -> None:
    """Start `count` workers now, before the study, so that their imports run while the run starts
    (the CLI's imports, Prefect's server, the data stage); the study takes them (for_study). Given the
    run's `tuning`, its study storage is made ready here first (the schema, on a first run: 1.3 s on
    SQLite here), and each worker opens it while it waits: two processes creating one schema at once
    could collide."""
    global _started_ahead
    if count > 0 and _started_ahead is None:
        _started_ahead = TuningWorkers(count, storage_made_ready(tuning))


def storage_made_ready(tuning):
    """The run's tuning with its storage ready (tasks.tune.ready_storage), or None: no tuning given,
    or a storage that does not open, which the study then reports in one line."""
    from tasks.tune import ready_storage

    if tuning is None:
        return None
    try:
        return ready_storage(tuning)
    except Exception:  # noqa: BLE001 - reported by the study's own open
        return None


def stop_ahead() -> None:
    """End workers started ahead that no study took (the run failed or skipped tuning)."""
    global _started_ahead
    workers, _started_ahead = _started_ahead, None
    if workers is not None:
        workers.stop()


@contextmanager
def workers_ahead(count: int, tuning=None) -> Iterator[None]:
    """`count` workers started ahead (or kept, if the CLI started them) for the length of a run; the
    ones no study took end with it."""
    if count > 0:
        start_ahead(count, tuning)
    else:
        stop_ahead()
    try:
        yield
    finally:
        stop_ahead()


def for_study(job: StudyJob) -> TuningWorkers:
    """The workers started ahead, if they fit the study, else new ones; each given the study."""
    global _started_ahead
    workers, _started_ahead = _started_ahead, None
    wanted = job.tuning.workers - 1
    if workers is not None and (len(workers.processes) != wanted or workers.dead()):
        workers.stop()
        workers = None
    workers = workers or TuningWorkers(wanted)
    workers.begin(job)
    return workers


# --- workers on other hosts (`maas tune-worker`) ---------------------------------------------------

JOB_ATTR = "maas.job"  # the study's user attribute a run with tuning.remote_workers publishes


def publish_job(study: optuna.Study, job: StudyJob, parent) -> None:
    """What a `maas tune-worker` elsewhere needs besides its own copy of the data: the trials' settings,
    the run's (budgeted) tuning without its storage URL (a password stays out of the database), the
    data's fingerprint to check its copy against, the deadline and the MLflow parent run."""
    study.set_user_attr(JOB_ATTR, {
        "model": job.settings.model.model_dump(mode="json"), "train": job.settings.train.model_dump(mode="json"),
        "tuning": job.tuning.model_dump(mode="json", exclude={"storage"}), "seed": job.seed,
        "deadline": None if math.isinf(job.deadline) else job.deadline, "data": trial_data_digest(job.prepared),
        "parent": list(parent) if parent else None})


def trial_data_digest(prepared) -> str:
    """The exact arrays trials train and validate on: a worker's copy must equal the run's (same file,
    seed, split and sample), or its trials would be scored on other rows."""
    import hashlib

    arrays = prepared.arrays
    digest = hashlib.sha256()
    for array in (arrays.x_train, arrays.y_train, arrays.x_val, arrays.y_val):
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def published_job(storage, study_name: str, wait_s: float, say: Callable[[str], None]) -> dict:
    """The study's job, once a run with tuning.remote_workers has published it."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            if JOB_ATTR in study.user_attrs:
                return study.user_attrs[JOB_ATTR]
        except KeyError:  # no such study yet
            pass
        if time.monotonic() >= deadline:
            from maas.errors import MaasInputError

            raise MaasInputError(f"tune-worker: no run published study '{study_name}' in {wait_s:.0f} s "
                                 "(is tuning.remote_workers true in the run, and tuning.storage the same?)")
        if not said:
            say(f"waiting for a run to open study '{study_name}'")
            said = True
        time.sleep(1.0)


def remote_worker(config, study_name: str, wait_s: float, say: Callable[[str], None]) -> int:
    """`maas tune-worker`: this host's copy of the run's data (checked against the run's rows),
    trials of the run's study until it holds its budget, each trial's child run written under the run's
    parent (MLFLOW_TRACKING_URI must name the run's tracking server). Returns the trials it trained."""
    from maas.config import ModelConfig, TrainConfig, TuningConfig
    from maas.errors import MaasInputError
    from maas.run_context import RunContext
    from maas.tracking import mlflow_client
    from maas.studies import study_for_table
    from tasks.data import prepare_data
    from tasks.recovery import TRIAL_OWNER_ATTR
    from tasks.train import TrainingSettings
    from tasks.tune import FailureGuard, Objective, TrialTracker, make_pruner, make_sampler, open_storage

    warm_up()  # before the run opens its study, not in this worker's first trial
    prepared = prepare_data(config.data, config.seed)
    # the study the run opens for this table (a grown table gets a study of its own)
    configured = open_storage(config.tuning)
    study_name = study_for_table(configured, study_name, prepared.fingerprint)
    job = published_job(configured, study_name, wait_s, say)
    tuning = TuningConfig(**job["tuning"], storage=config.tuning.storage)
    storage = open_storage(tuning)  # the run's heartbeat settings, which its stale-trial check assumes
    if job["seed"] != config.seed:
        prepared = prepare_data(config.data, job["seed"])
    prepared = prepared.sealed()  # the run's seed: its split
    trial_data = prepared.with_training_sample(tuning.sample_rows, job["seed"])
    if trial_data_digest(trial_data) != job["data"]:
        raise MaasInputError(f"tune-worker: the data here ({prepared.source}) does not give the run's training and "
                             "validation rows: give the run's dataset, target and data settings")
    tracker = None
    if job["parent"]:
        run_id, experiment_id = job["parent"]
        context = RunContext(client=mlflow_client(), run_id=run_id, experiment_id=experiment_id,
                             scratch=Path(tempfile.gettempdir()))  # trials write no files
        tracker = TrialTracker(context, study_name)
    objective = Objective(trial_data, TrainingSettings(ModelConfig(**job["model"]), TrainConfig(**job["train"])),
                          tuning, job["seed"], tracker)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(tuning),
                              sampler=make_sampler(tuning, objective.family, job["seed"] + os.getpid()))
    say(f"joined study '{study_name}': {len(trial_data.splits.y_train)} training rows a trial, "
        f"{tuning.n_trials} trials in all")
    deadline = job["deadline"] if job["deadline"] is not None else math.inf
    trials_one_at_a_time(study, objective, deadline, [FailureGuard(tuning.max_failures)], take_waiting=False)
    return sum(trial.user_attrs.get(TRIAL_OWNER_ATTR) == objective.owner for trial in study.get_trials(deepcopy=False))
