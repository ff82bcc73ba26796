"""SIGTERM for the commands that run one flow and end (`maas run`, `maas monitor`).

Python's default for SIGTERM exits at once, and left Prefect's temporary server running, orphaned. So
the signal is raised where the process is, as Ctrl-C is: what the command started is stopped and closed
on the way out (Prefect's server; the MLflow run, marked KILLED) and the command exits 143.

Inside a flow run Prefect puts its own handler in place of ours. It raises its TerminationSignal and
passes the signal on to ours only where that exception reaches its engine. Code that wraps whatever it
catches turned it into a plain error once: pydantic, building a validator lazily when the signal came,
gave a SchemaError, and the run failed with exit 1, a traceback and its MLflow run FAILED. So the signal
is also noted where it arrives, and the way out asks `termination_requested()`, not the exception's type.
"""

from __future__ import annotations

import logging
import signal
import threading

_requested = threading.Event()
# Prefect's loggers that write a failed flow or task run's traceback.
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C is: `except Exception` lets it through to the command's way out."""


def termination_requested() -> bool:
    """Whether this process has been sent SIGTERM, whatever became of the exception it raised."""
    return _requested.is_set()


def raise_terminated(_signal_number, _frame) -> None:
    _requested.set()
    raise Terminated()


def handle_sigterm() -> None:
    """Raise SIGTERM as `Terminated` where it has Python's default; a host program's own handler stays."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)


class WithoutTracebackOnceTerminated(logging.Filter):
    """After SIGTERM a failed run's exception is the signal, wrapped by whoever caught it: one line, not
    a traceback, as for a run stopped without the wrapping."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and termination_requested():
            record.exc_info = None
            record.exc_text = None
        return True


def note_sigterm_under_prefect() -> None:
    """Have Prefect's SIGTERM handler note the signal before it raises, and its run loggers write no
    traceback once it has come. Call it after Prefect is imported (the import costs seconds that bad
    input should not pay). Prefect looks its handler up by this module-level name each time it installs
    or checks it, so the wrapped one is used throughout; tests/unit/test_termination.py fails if a Prefect
    upgrade renames it."""
    from prefect.utilities import engine

    prefects = engine._prefect_sigterm_handler
    if getattr(prefects, "notes_termination", False):
        return

    def noting(signal_number: int, *args: object):
        _requested.set()
        return prefects(signal_number, *args)

    noting.notes_termination = True
    engine._prefect_sigterm_handler = noting
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(WithoutTracebackOnceTerminated())
