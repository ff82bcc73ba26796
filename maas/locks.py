"""A lock that several processes on one machine share through a file (flock: released if the holder dies)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold `path`'s lock for the block; another holder of the same path, in any process, waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_schema_lock(url: str) -> contextlib.AbstractContextManager:
    """On a SQLite file, a lock beside it (`<file>.lock`) while a library makes or migrates its
    schema there: processes starting at once on a new file each made the tables, and all but one
    failed (Optuna on the schema version's unique key, MLflow's migrations on "duplicate column").
    A server database serialises that itself: no lock."""
    from sqlalchemy.engine import make_url

    database = make_url(url).database if url.startswith("sqlite") else None
    if not database or database == ":memory:":
        return contextlib.nullcontext()
    return file_lock(Path(f"{database}.lock"))
