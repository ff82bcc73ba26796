"""MLflow writes that nothing downstream reads (trial and variant child runs, plots), done by a helper
process on the other core while the pipeline computes.

Measured here: MLflow's SQLAlchemy store spends 10-30 ms of CPU per call (a trial's child run takes
four), and matplotlib ~0.15 s per plot. Written in line, they cost a default breast_cancer run ~4 s
of its ~25 (benchmarks/results/pipeline_overhead.md); a thread would not help, since that work holds
the GIL. A job is a module-level function `job(client, *args)`: the helper calls it with its own
MlflowClient, or the caller runs it in line when there is no helper (tests, plain calls).

The helper reads jobs from a one-way pipe: when the pipeline's process dies (even by SIGKILL) the
pipe closes and the helper exits, and it also asks the kernel to kill it with its parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from maas.processes import die_with_parent

STOP = "stop"


def _serve(jobs: Connection, results: Connection, tracking_uri: str, parent_pid: int) -> None:
    """The helper's loop: run each job in order; answer pings; report failures at the end."""
    die_with_parent(parent_pid)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from maas.figures import warm_up

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    warm_up()  # while the pipeline's first stage runs, not when the first figure is due
    failures: list[str] = []
    while True:
        try:
            message = jobs.recv()
        except EOFError:  # the pipeline's process is gone
            return
        if message == STOP:
            results.send(failures)
            os._exit(0)  # every job is done; MLflow's exit handlers would only delay the pipeline
        job, args = message
        try:
            job(client, *args)
        except Exception as error:  # noqa: BLE001 - reported to the pipeline, which logs it
            failures.append(f"{job.__name__}: {error.__class__.__name__}: {error}")
            traceback.print_exc()


class Recorder:
    """A helper process that runs recording jobs in order, off the pipeline's critical path.

    Started as `python -m maas.recorder`, not with multiprocessing: its spawn re-imports the
    caller's __main__, which breaks a user's script that calls the flow without a main guard."""

    def __init__(self, tracking_uri: str):
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "maas.recorder", str(job_read), str(result_write), tracking_uri, str(os.getpid())],
            pass_fds=(job_read, result_write), stdin=subprocess.DEVNULL)
        os.close(job_read)  # the helper holds the only reading end: our exit is its EOF
        os.close(result_write)
        self._jobs, self._results = Connection(job_write, readable=False), Connection(result_read, writable=False)

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        self._jobs.send((job, args))

    def close(self) -> list[str]:
        """Run what is queued, stop the helper, and return the jobs that failed (one line each)."""
        try:
            self._jobs.send(STOP)
            failures = self._results.recv()
        except (EOFError, BrokenPipeError, OSError):
            failures = [f"the recorder process exited early (code {self._process.poll()})"]
        self._jobs.close()
        self._results.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        return failures


if __name__ == "__main__":
    job_fd, result_fd, uri, parent = sys.argv[1:5]
    _serve(Connection(int(job_fd), writable=False), Connection(int(result_fd), readable=False), uri, int(parent))
