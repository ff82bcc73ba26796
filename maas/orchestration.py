"""Shared bits of the Prefect task wrappers: the retry policy."""

from __future__ import annotations

from maas.errors import MaasInputError


def retry_unless_input_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never bad input (it would fail again)."""
    return not isinstance(state.data, MaasInputError)
