"""Shared bits of the Prefect task wrappers: retry policy and timing of a stage's own work."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from maas.errors import MaasInputError

T = TypeVar("T")


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never bad input (it would fail again)."""
    return not isinstance(state.data, MaasInputError)


def timed(work: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """(result, seconds): the stage's own compute time, apart from orchestration and tracking."""
    started = time.perf_counter()
    result = work(*args, **kwargs)
    return result, time.perf_counter() - started
