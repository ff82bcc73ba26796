"""API keys, usage metering, the prediction log and the monitor's state: one SQLite file under
MAAS_HOME, or (MAAS_STORE_URL=postgresql://...) one PostgreSQL database that every service replica,
the CLI and the monitor share, so usage is summed across hosts and the monitor reads every
replica's predictions.

Keys (maas/api_keys.py) are stored as SHA-256 hashes; the plain key is shown once, when it is
created. The audit trail (maas/audit.py) lives here too. The service reads and writes the store from
a background thread, never on a request's hot path. The file and its folder are the owner's only:
the prediction log holds callers' inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from maas.paths import maas_home

JOURNAL_SUFFIX = ".journal"  # a service worker's meter journal (deployments/metering.py)

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, tier TEXT NOT NULL, scopes TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL, revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_secrets (
    secret_hash TEXT PRIMARY KEY, key_id TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
    before TEXT NOT NULL, after TEXT NOT NULL, reason TEXT NOT NULL, previous_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, entry_hash TEXT NOT NULL);
INSERT INTO audit_head VALUES (1, 0, '') ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS billed_requests (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, logged_at REAL NOT NULL, PRIMARY KEY (key_id, request_id)
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, month TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, month)
);
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT NOT NULL, logged_at REAL NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,
    status INTEGER NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (logged_at);
CREATE TABLE IF NOT EXISTS meter_journals (name TEXT PRIMARY KEY, applied INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_checks (
    model TEXT NOT NULL, checked_at REAL NOT NULL, window_end REAL NOT NULL, service_counters TEXT
);
CREATE TABLE IF NOT EXISTS incidents (
    model TEXT NOT NULL, kind TEXT NOT NULL, opened_at REAL NOT NULL, closed_at REAL, detail TEXT NOT NULL
);
"""


def store_path() -> Path:
    return maas_home() / "service.db"


STORE_URL_ENV = "MAAS_STORE_URL"


def connect(path: Path | None = None):
    """The store: `path`, else MAAS_STORE_URL (a PostgreSQL URL), else service.db under MAAS_HOME.
    Either answers the sqlite3 calls this module makes (execute, executemany, `with` as a transaction)."""
    url = os.environ.get(STORE_URL_ENV) if path is None else None
    if url:
        return PostgresStore(url)
    path = path or store_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():  # created owner-only; SQLite gives its -wal/-shm files the same mode
        # Never open-and-close a database file this process already has open: closing any descriptor
        # of a file drops every POSIX lock the process holds on it, the other connections' included
        # (SQLite's own warning), and the service's meter then failed with "disk I/O error".
        with contextlib.suppress(FileExistsError):  # another process made it a moment ago
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    connection = sqlite3.connect(path, timeout=30, check_same_thread=False)
    in_wal_mode(connection)  # readers (maas usage) never block the service
    connection.executescript(SCHEMA)
    if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'").fetchone():
        with connection:
            migrate_keys_before_scopes(connection)
    return connection


def in_wal_mode(connection, tries: int = 100) -> None:
    """Switch the database to WAL once. SQLite does not wait on its busy timeout for this switch:
    three processes opening a new store at once got "database is locked" from one of them (an audit
    test's writers). Reading the mode takes no lock, so a store already in WAL skips the switch, and
    a switch that meets another is tried again, for up to ~5 s."""
    for attempt in range(tries):
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == tries - 1:
                raise
            time.sleep(0.05)


def migrate_keys_before_scopes(connection) -> None:
    """A store from before scopes and rotation kept one hash per key in `api_keys`: its keys move to
    `keys` / `key_secrets` with scope predict and keep working (their format has no checksum: see
    maas/api_keys.py), and the old table is renamed, so this runs once."""
    def epoch(text: str | None) -> float | None:
        return datetime.fromisoformat(text).timestamp() if text else None

    rows = connection.execute("SELECT key_id, key_hash, name, tier, created_at, revoked_at FROM api_keys").fetchall()
    for key_id, key_hash, name, tier, created, revoked in rows:
        connection.execute("INSERT INTO keys VALUES (?, ?, ?, 'predict', ?, NULL, ?) ON CONFLICT (key_id) DO NOTHING",
                           (key_id, name, tier, epoch(created), epoch(revoked)))
        connection.execute("INSERT INTO key_secrets VALUES (?, ?, ?, NULL) ON CONFLICT (secret_hash) DO NOTHING",
                           (key_hash, key_id, epoch(created)))
    connection.execute("ALTER TABLE api_keys RENAME TO api_keys_before_scopes")


class PostgresStore:
    """The same store on PostgreSQL, behind the slice of sqlite3's Connection this module uses: `?`
    placeholders become `%s`; REAL columns (epoch seconds) become DOUBLE PRECISION, since PostgreSQL's
    REAL is 4 bytes and would round a timestamp to minutes; counters become BIGINT; and SQLite's
    BEGIN IMMEDIATE (take the write lock first) becomes a transaction that locks meter_journals, so two
    replicas applying one journal still see each other's offset."""

    def __init__(self, url: str):
        import psycopg

        from maas.errors import MaasInputError
        from maas.tracking import redact_url

        try:
            self.connection = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True,
                                              connect_timeout=10)
        except psycopg.Error as exc:
            raise MaasInputError(f"{STORE_URL_ENV}: cannot reach {redact_url(url)} ({exc.__class__.__name__})") from None
        self._transactions: list = []
        schema = SCHEMA.replace(" REAL", " DOUBLE PRECISION").replace("INTEGER", "BIGINT")
        with self.connection.transaction():
            self.connection.execute("SELECT pg_advisory_xact_lock(7215)")  # two replicas creating it at once
            for statement in filter(str.strip, schema.split(";")):
                self.connection.execute(statement)
            if self.connection.execute("SELECT to_regclass('api_keys')").fetchone()[0]:
                migrate_keys_before_scopes(self)

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")  # the store's SQL has no literal '?'

    def execute(self, sql: str, params: tuple = ()):
        if sql == "BEGIN IMMEDIATE":
            self.connection.execute("BEGIN")
            return self.connection.execute("LOCK TABLE meter_journals IN SHARE ROW EXCLUSIVE MODE")
        return self.connection.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(self._sql(sql), list(rows))

    def __enter__(self):
        transaction = self.connection.transaction()  # nested: a savepoint inside the caller's
        transaction.__enter__()
        self._transactions.append(transaction)
        return self

    def __exit__(self, *exc_info):
        return self._transactions.pop().__exit__(*exc_info)

    def close(self) -> None:
        self.connection.close()


_MONTH = ["", 0.0, 0.0]  # the last month asked for, and its start and end (epoch seconds)


def current_month(now: float | None = None) -> str:
    """YYYY-MM (UTC) of `now`; asked on every request and every journal line, so the month last
    asked for is kept with its bounds instead of formatting a date each time."""
    now = now or time.time()
    month, start, end = _MONTH
    if start <= now < end:
        return month
    moment = datetime.fromtimestamp(now, timezone.utc)
    _MONTH[:] = [moment.strftime("%Y-%m"), *month_bounds(moment)]
    return _MONTH[0]


def month_bounds(moment: datetime) -> tuple[float, float]:
    """Epoch seconds of the first instant of `moment`'s month (UTC) and of the next month's."""
    first = datetime(moment.year, moment.month, 1, tzinfo=timezone.utc)
    following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=timezone.utc)
    return first.timestamp(), following.timestamp()


def iso(epoch: float | None) -> str:
    """An epoch time as the store's CLI and JSON show it (UTC, to the second); '-' for none."""
    return "-" if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def rows_used(connection: sqlite3.Connection, month: str) -> dict[str, int]:
    return dict(connection.execute("SELECT key_id, rows FROM usage WHERE month = ?", (month,)))


def record_usage(connection: sqlite3.Connection, month: str, counts: dict[str, tuple[int, int, int]]) -> None:
    """Add (requests, rows, errors) per key for the month, in one transaction."""
    with connection:
        add_usage(connection, month, counts)


def add_usage(connection: sqlite3.Connection, month: str, counts: dict[str, tuple[int, int, int]]) -> None:
    connection.executemany(
        "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, month) DO UPDATE SET "
        "requests = usage.requests + excluded.requests, rows = usage.rows + excluded.rows, "
        "errors = usage.errors + excluded.errors",
        [(key_id, month, *values) for key_id, values in counts.items()],
    )


def apply_journal(connection: sqlite3.Connection, path: Path, finished: bool) -> int:
    """Bring a worker's meter journal into the store, exactly once: the records past the offset this
    store has applied, added in the same transaction that moves the offset. BEGIN IMMEDIATE takes
    the write lock first, so two processes applying one journal see each other's offset. A finished
    journal (its worker rotated it or died) is deleted once applied. Returns the requests applied.

    Each line is a JSON record {"k": key id, "r": rows, "s": status, "t": time, "m": model label,
    "i": request id, "c": 1 when the caller chose the id, "q": logged request body, "a": logged
    answer} ("q"/"a" only when sampled)."""
    import orjson

    name = path.name
    connection.execute("BEGIN IMMEDIATE")
    try:
        found = connection.execute("SELECT applied FROM meter_journals WHERE name = ?", (name,)).fetchone()
        applied = found[0] if found else 0
        try:
            with path.open("rb") as journal:
                journal.seek(applied)
                data = journal.read()
        except FileNotFoundError:
            data = b""
        complete = data[:data.rfind(b"\n") + 1]  # a line cut short by a kill mid-write waits for its end
        counts: dict[tuple[str, str], list[int]] = {}
        entries = []
        for line in complete.splitlines():
            record = orjson.loads(line)
            total = counts.setdefault((current_month(record["t"]), record["k"]), [0, 0, 0])
            total[0] += 1
            total[1] += record["r"] if record["s"] < 400 and not already_billed(connection, record) else 0
            total[2] += record["s"] >= 400
            if record.get("q") is not None:
                entries.append((record["i"], record["t"], record["k"], record["m"], record["s"], record["q"], record["a"]))
        for month in {month for month, _ in counts}:
            add_usage(connection, month, {key: tuple(total) for (m, key), total in counts.items() if m == month})
        if entries:
            connection.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)", entries)
        connection.execute("INSERT INTO meter_journals VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET applied = "
                           "excluded.applied", (name, applied + len(complete)))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if finished and len(complete) == len(data):
        path.unlink(missing_ok=True)  # its offset row stays: a few bytes per finished journal
    return sum(total[0] for total in counts.values())


def already_billed(connection, record: dict) -> bool:
    """A successful request whose caller-chosen X-Request-Id this key was billed for before: a retry,
    whose rows are not counted again. Ids the service made up are unique, so they are not stored."""
    if not record.get("c"):
        return False
    cursor = connection.execute("INSERT INTO billed_requests VALUES (?, ?, ?) ON CONFLICT (key_id, request_id) "
                                "DO NOTHING", (record["k"], record["i"], record["t"]))
    return cursor.rowcount == 0


def journal_writer_gone(path: Path) -> bool:
    host, pid, started, _ = path.name.removesuffix(JOURNAL_SUFFIX).split("~")
    from maas.processes import owner_is_gone

    return owner_is_gone({"maas.host": host, "maas.pid": pid, "maas.process_started": started}) is not None


def apply_journals(connection: sqlite3.Connection, folder: Path, own_path: Path | None = None,
                   own_prefix: str | None = None) -> int:
    """Every journal in folder whose writer is gone, our own finished ones, and our current one (kept).
    Another live worker's journal is its own flush thread's job. Returns the requests applied."""
    applied = 0
    for path in sorted(folder.glob(f"*{JOURNAL_SUFFIX}")):
        if path == own_path:
            applied += apply_journal(connection, path, finished=False)
        elif (own_prefix and path.name.startswith(own_prefix + "~")) or journal_writer_gone(path):
            applied += apply_journal(connection, path, finished=True)
    return applied


def meter_folder() -> Path:
    return maas_home() / "run" / "meter"


def connect_settled():
    """The store with what service workers that are gone journaled brought in: what `maas usage`,
    `maas bill`, `maas purge` and the monitor read (live workers bring in their own each second)."""
    connection = connect()
    apply_journals(connection, meter_folder())
    return connection


def usage_report(connection: sqlite3.Connection, month: str | None = None) -> list[dict]:
    query = ("SELECT u.key_id, COALESCE(k.name, u.key_id), COALESCE(k.tier, '-'), u.month, u.requests, u.rows, "
             "u.errors FROM usage u LEFT JOIN keys k ON k.key_id = u.key_id")
    rows = connection.execute(query + (" WHERE u.month = ?" if month else "") + " ORDER BY u.month, u.key_id",
                              (month,) if month else ())
    return [dict(zip(("key_id", "name", "tier", "month", "requests", "rows", "errors"), row)) for row in rows]


def log_predictions(connection: sqlite3.Connection, entries: list[tuple]) -> None:
    """(request_id, logged_at, key_id, model, status, inputs, outputs) rows; inputs is the request
    body ({"rows": [...]}, stored as received so the service does not serialize it again),
    outputs the answer, both JSON."""
    with connection:
        connection.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)", entries)


def read_predictions(connection: sqlite3.Connection, since: float = 0.0) -> list[dict]:
    rows = connection.execute(
        "SELECT request_id, logged_at, key_id, model, status, inputs, outputs FROM predictions "
        "WHERE logged_at > ? ORDER BY logged_at", (since,))
    return [{"request_id": r[0], "logged_at": r[1], "key_id": r[2], "model": r[3], "status": r[4],
             "inputs": json.loads(r[5])["rows"], "outputs": json.loads(r[6])} for r in rows]


def last_check(connection: sqlite3.Connection, model: str) -> tuple[float, dict | None]:
    """(end of the window the last check covered, the service counters it scraped) for a model."""
    row = connection.execute("SELECT window_end, service_counters FROM monitor_checks WHERE model = ? "
                             "ORDER BY checked_at DESC LIMIT 1", (model,)).fetchone()
    if row is None:
        return 0.0, None
    return row[0], json.loads(row[1]) if row[1] else None


def save_check(connection: sqlite3.Connection, model: str, window_end: float, counters: dict | None) -> None:
    with connection:
        connection.execute("INSERT INTO monitor_checks VALUES (?, ?, ?, ?)",
                           (model, time.time(), window_end, json.dumps(counters) if counters else None))


def open_incidents(connection: sqlite3.Connection, model: str) -> dict[str, str]:
    """kind -> detail of the incidents still open for a model."""
    rows = connection.execute("SELECT kind, detail FROM incidents WHERE model = ? AND closed_at IS NULL", (model,))
    return dict(rows)


def open_incident(connection: sqlite3.Connection, model: str, kind: str, detail: str) -> None:
    with connection:
        connection.execute("INSERT INTO incidents VALUES (?, ?, ?, NULL, ?)", (model, kind, time.time(), detail))


def close_incident(connection: sqlite3.Connection, model: str, kind: str) -> None:
    with connection:
        connection.execute("UPDATE incidents SET closed_at = ? WHERE model = ? AND kind = ? AND closed_at IS NULL",
                           (time.time(), model, kind))
