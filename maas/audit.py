"""The audit trail: who changed what, append-only and hash-chained, in the service store.

Each entry (actor, action, target, before -> after, time, reason) carries the SHA-256 of its own
content and of the entry before it, so editing or deleting any entry breaks every hash after it:
`maas audit verify` finds the first break. The head (last sequence number and hash) is kept in its
own row and printed by `verify`: keeping that line somewhere else (a ticket, a chat) also catches
the one change a chain cannot, cutting entries off its end.

Appenders take the head row's lock first (an UPDATE of that row, on SQLite and PostgreSQL alike),
so processes writing at once still form one chain.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

ACTOR_ENV = "MAAS_ACTOR"  # who the CLI acts as; default user@host


def current_actor() -> str:
    return os.environ.get(ACTOR_ENV) or f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class Entry:
    seq: int
    at: float
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    reason: str
    previous_hash: str
    entry_hash: str

    def content(self) -> list:
        return [self.seq, self.at, self.actor, self.action, self.target, self.before, self.after, self.reason]

    def as_dict(self) -> dict:
        from maas.service_store import iso

        return {"seq": self.seq, "time": iso(self.at), "actor": self.actor, "action": self.action,
                "target": self.target, "before": self.before, "after": self.after, "reason": self.reason,
                "hash": self.entry_hash}


def chained_hash(previous_hash: str, content: list) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{previous_hash}\n{canonical}".encode()).hexdigest()


def append(connection, action: str, target: str, before: Any = None, after: Any = None, reason: str = "",
           actor: str | None = None) -> Entry:
    """One entry, in the caller's transaction when there is one (a key and its audit entry commit
    together), else in its own."""
    with connection:
        connection.execute("UPDATE audit_head SET seq = seq WHERE id = 1")  # the lock every appender queues on
        seq, previous = connection.execute("SELECT seq, entry_hash FROM audit_head WHERE id = 1").fetchone()
        entry = Entry(seq + 1, time.time(), actor or current_actor(), action, target, before, after, reason, previous, "")
        entry = Entry(*entry.content(), previous, chained_hash(previous, entry.content()))
        connection.execute("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (entry.seq, entry.at, entry.actor, entry.action, entry.target, json.dumps(entry.before),
                            json.dumps(entry.after), entry.reason, entry.previous_hash, entry.entry_hash))
        connection.execute("UPDATE audit_head SET seq = ?, entry_hash = ? WHERE id = 1", (entry.seq, entry.entry_hash))
    return entry


def entries(connection, action: str | None = None, limit: int | None = None) -> list[Entry]:
    """The log in order; `action`: only entries whose action starts with it (key, alias, retrain...)."""
    rows = connection.execute("SELECT seq, at, actor, action, target, before, after, reason, previous_hash, "
                              "entry_hash FROM audit_log ORDER BY seq").fetchall()
    found = [Entry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), *r[7:]) for r in rows]
    if action:
        found = [entry for entry in found if entry.action.startswith(action)]
    return found[-limit:] if limit else found


@dataclass(frozen=True)
class Verdict:
    entries: int
    head: str
    problems: list[str]

    @property
    def intact(self) -> bool:
        return not self.problems


def verify(connection, expected_head: str | None = None) -> Verdict:
    """Recompute the chain: every entry's hash, its link to the one before, no gap in the sequence,
    and the head row (and `expected_head`, a hash printed by an earlier verify) on the chain."""
    problems, previous, seq = [], "", 0
    chain_hashes = set()
    for entry in entries(connection):
        seq += 1
        if entry.seq != seq:
            problems.append(f"entry {seq}: missing (the next is {entry.seq}): entries were deleted")
            seq = entry.seq
        if entry.previous_hash != previous:
            problems.append(f"entry {entry.seq}: does not follow the entry before it (one was changed or deleted)")
        if chained_hash(entry.previous_hash, entry.content()) != entry.entry_hash:
            problems.append(f"entry {entry.seq}: its content does not match its hash (it was edited)")
        previous = entry.entry_hash
        chain_hashes.add(entry.entry_hash)
    head_seq, head_hash = connection.execute("SELECT seq, entry_hash FROM audit_head WHERE id = 1").fetchone()
    if (head_seq, head_hash) != (seq, previous):
        problems.append(f"head: says entry {head_seq}, the log ends at entry {seq} (entries were cut off or added "
                        "around the chain)")
    if expected_head and expected_head not in chain_hashes:
        problems.append(f"expected head {expected_head[:16]}...: not in the chain (entries were cut off or rewritten)")
    return Verdict(seq, previous, problems)
