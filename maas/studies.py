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


TABLE_ATTR = "maas.dataset_fingerprint"  # the table a study's trials were scored on (tasks/data.py: fingerprint_table)


def study_for_table(storage, name: str, fingerprint: str) -> str:
    """The study a run on this table continues: `name` while it holds this table's trials (or none
    yet, or trials from before studies recorded their table), else name-<fingerprint's first 8>.

    A table that grew since the last run (a scheduled retraining, labelled rows appended) is split
    anew: trials scored on the old validation rows do not rank against the new ones, and a study that
    had held its budget ran no trial at all, so every retraining kept the first table's settings and
    judged them by its scores."""
    import optuna

    try:
        recorded = optuna.load_study(study_name=name, storage=storage).user_attrs.get(TABLE_ATTR)
    except KeyError:  # no such study yet
        return name
    return name if recorded in (None, fingerprint) else f"{name}-{fingerprint[:8]}"


def open_table_study(storage, name: str, fingerprint: str, **create_study):
    """optuna.create_study(..., load_if_exists=True) on the study for this table (study_for_table),
    recording the table in it."""
    import optuna

    study = optuna.create_study(study_name=study_for_table(storage, name, fingerprint), storage=storage,
                                load_if_exists=True, **create_study)
    if TABLE_ATTR not in study.user_attrs:
        study.set_user_attr(TABLE_ATTR, fingerprint)
    return study
