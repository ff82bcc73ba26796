"""Optuna helpers shared by every study: the text encoder's search (models/text_search.py) and each
model family's tuning (tasks/families.py)."""

from __future__ import annotations

from pathlib import Path


def journal_storage(journal: Path):
    """The Optuna storage of a search's journal file (JSON lines, no server, safe for resuming)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal)))


def finished_trials(study) -> list:
    """A study's completed trials (not pruned, failed or running), without copying them."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
