"""Tier limits shared by the service's worker processes.

BentoML runs `workers` processes that accept on one socket, so a key's requests land on any of
them. Per key, a token bucket (requests per minute) and the month's row count live in one small
memory-mapped file, read and updated under an exclusive flock (a few microseconds). Each process
keeping its own counts would let every key through at `workers` times its tier's rate and quota.

The file belongs to one `bentoml serve` (named after its arbiter's pid); a key's row count starts
from the usage table the first time the key is seen in a month.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

# key id (utf-8, zero-padded), tokens, last refill (CLOCK_MONOTONIC, shared by the host's
# processes), rows this month, month as yyyymm
SLOT = struct.Struct("<48s d d q i")
CAPACITY = 65_536  # keys; 3.9 MB of file, most of it never touched


class LimitsFull(RuntimeError):
    pass


class Taken(NamedTuple):
    """A rate-limit check: the seconds to wait (0: the request may go, its token is spent) and the
    tokens left in the key's bucket after it."""

    wait: float
    remaining: float


class SharedLimits:
    awaited = False  # take and reserve_rows answer at once (RedisLimits' are coroutines)

    def __init__(self, path: Path, rows_so_far: Callable[[str, str], int], capacity: int = CAPACITY):
        """rows_so_far(key_id, month "YYYY-MM"): the rows already metered for a key this month."""
        self.rows_so_far, self.capacity = rows_so_far, capacity
        self.offsets: dict[str, int] = {}  # key id -> its slot's offset in the file
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOT.size * capacity
        with self.locked():
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def locked(self):
        return _FileLock(self.fd)

    def _slot(self, key_id: str) -> tuple[int, tuple]:
        """(offset, fields) of the key's slot, claimed if new: linear probing from the key's hash. A
        slot, once claimed, is the key's for the file's life (none is ever freed), so this process
        remembers where it is."""
        offset = self.offsets.get(key_id)
        if offset is not None:
            return offset, SLOT.unpack_from(self.map, offset)
        offset, fields = self._find_slot(key_id)
        self.offsets[key_id] = offset
        return offset, fields

    def _find_slot(self, key_id: str) -> tuple[int, tuple]:
        name = key_id.encode()[:48].ljust(48, b"\0")  # key ids are 8 hex digits
        start = zlib.crc32(name) % self.capacity
        for probe in range(self.capacity):
            offset = ((start + probe) % self.capacity) * SLOT.size
            fields = SLOT.unpack_from(self.map, offset)
            if fields[0] == name:
                return offset, fields
            if fields[0] == bytes(48):
                fields = (name, float("nan"), 0.0, 0, 0)
                SLOT.pack_into(self.map, offset, *fields)
                return offset, fields
        raise LimitsFull(f"more than {self.capacity} API keys in use")

    def take(self, key_id: str, per_minute: int) -> Taken:
        """wait 0 if the key may make a request now (and the token is spent), else the seconds to wait."""
        now = time.monotonic()
        with self.locked():
            offset, (name, tokens, last, rows, month) = self._slot(key_id)
            tokens = float(per_minute) if tokens != tokens else min(float(per_minute), tokens + (now - last) * per_minute / 60)
            wait = 0.0
            if tokens < 1:
                wait = (1 - tokens) * 60 / per_minute
            else:
                tokens -= 1
            SLOT.pack_into(self.map, offset, name, tokens, now, rows, month)
        return Taken(wait, tokens)

    def reserve_rows(self, key_id: str, rows: int, monthly_rows: int, month: str) -> bool:
        """Count `rows` against the key's monthly quota if they fit; False (nothing counted) if not."""
        month_number = int(month.replace("-", ""))
        with self.locked():
            offset, (name, tokens, last, used, slot_month) = self._slot(key_id)
            if slot_month != month_number:
                used = self.rows_so_far(key_id, month)
            fits = used + rows <= monthly_rows
            SLOT.pack_into(self.map, offset, name, tokens, last, used + rows if fits else used, month_number)
        return fits


class _FileLock:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def open_limits(settings, folder: Path, rows_so_far: Callable[[str, str], int]):
    """The tier limits `serving.limits_backend` names: this server's workers (local) or every
    replica's (redis, deployments/redis_limits.py)."""
    if settings.limits_backend == "redis":
        from deployments.redis_limits import RedisLimits

        return RedisLimits(settings.redis_url, settings.limits_prefix, rows_so_far)
    return SharedLimits(limits_file(folder), rows_so_far)


def limits_file(folder: Path) -> Path:
    """This `bentoml serve`'s file (its workers share the arbiter as parent); files of servers
    that are gone are removed."""
    for old in folder.glob("limits-*.bin"):
        pid = old.stem.removeprefix("limits-")
        if pid.isdigit() and int(pid) != os.getppid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    return folder / f"limits-{os.getppid()}.bin"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
