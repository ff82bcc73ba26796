"""API keys as a platform issues them: a recognisable format with a checksum, scopes, an optional
expiry, and rotation with overlap.

A key reads `maas_` + 32 random base62 characters + a 6-character base62 CRC32 of them (GitHub's
token format): a secret scanner, and the service, can tell a real-looking key from a typo or a
lookalike offline, so a malformed key is refused before any lookup. Only a key's SHA-256 is stored.

A key (key_id: what usage, limits and bills count against) has one or more secrets. Rotation adds a
new secret that works at once and gives the old one a grace period, after which it is refused: the
callers of a key can move to the new secret without a moment where neither works, and the key's
usage, quota and bill stay one.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
import zlib
from dataclasses import dataclass

from maas import audit
from maas.service_store import iso

KEY_PREFIX = "maas_"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
RANDOM_CHARS, CHECKSUM_CHARS = 32, 6
KEY_LENGTH = len(KEY_PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS

SCOPES = ("predict", "read:usage", "admin")
SCOPE_MEANING = {
    "predict": "POST /predict",
    "read:usage": "the key's own usage and bill over HTTP (GET /usage), and /metrics when it is not public",
    "admin": "key management, the audit log and every key's usage over HTTP (/admin/...)",
}


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def _checksum(random_part: str) -> str:
    return _base62(zlib.crc32(random_part.encode()), CHECKSUM_CHARS)


def new_secret() -> str:
    random_part = "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))
    return KEY_PREFIX + random_part + _checksum(random_part)


LEGACY_LENGTH = len(KEY_PREFIX) + 32  # maas_ + token_urlsafe(24): keys issued before this format


def well_formed(key: str) -> bool:
    """The prefix, the length, the alphabet and the checksum: no lookup, no timing to learn from.
    A key issued before the checksum (maas_ + 32 URL-safe characters) passes on its shape alone,
    so its holder is not locked out by an upgrade; `maas keys rotate` gives it the new format."""
    if len(key) == LEGACY_LENGTH and key.startswith(KEY_PREFIX):
        return key[len(KEY_PREFIX):].replace("-", "").replace("_", "").isalnum() and key.isascii()
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    body = key[len(KEY_PREFIX):]
    if not (body.isascii() and body.isalnum()):  # base62 is ASCII letters and digits (and this is C, not a loop)
        return False
    return secrets.compare_digest(_checksum(body[:RANDOM_CHARS]), body[RANDOM_CHARS:])


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(scopes: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    from maas.errors import MaasInputError

    chosen = tuple(dict.fromkeys(scopes or ("predict",)))
    unknown = [scope for scope in chosen if scope not in SCOPES]
    if unknown:
        raise MaasInputError(f"--scope '{unknown[0]}': not a scope ({', '.join(SCOPES)})")
    return chosen


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    tier: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    secrets: int = 1  # secrets that still work (2 during a rotation's grace period)

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"


@dataclass(frozen=True)
class Grant:
    """What a presented secret may do, as the service holds it in memory (reloaded every second)."""

    key_id: str
    tier: str
    scopes: frozenset[str]
    ends_at: float | None  # the earlier of the key's expiry and this secret's end of grace
    ending: str  # why it ends then: "expired" or "rotated out"

    def refusal(self, scope: str, now: float) -> tuple[int, str] | None:
        """(status, message) when this secret may not be used for `scope` now; None when it may."""
        if self.ends_at is not None and self.ends_at <= now:
            return 401, f"API key {self.key_id} {self.ending} at {iso(self.ends_at)}"
        if scope not in self.scopes:
            return 403, f"API key {self.key_id} lacks scope '{scope}' (it has: {', '.join(sorted(self.scopes))})"
        return None


def create_key(connection, name: str, tier: str, scopes: tuple[str, ...] = ("predict",),
               expires_at: float | None = None, actor: str | None = None) -> tuple[ApiKey, str]:
    """A new key; returns its record and the plain secret, which is not stored anywhere."""
    plain, key_id, now = new_secret(), secrets.token_hex(4), time.time()
    with connection:
        connection.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                           (key_id, name, tier, ",".join(scopes), now, expires_at))
        connection.execute("INSERT INTO key_secrets VALUES (?, ?, ?, NULL)", (hash_key(plain), key_id, now))
        audit.append(connection, "key.create", f"key {key_id}", None,
                     {"name": name, "tier": tier, "scopes": list(scopes), "expires_at": iso(expires_at)}, actor=actor)
    return ApiKey(key_id, name, tier, scopes, now, expires_at, None), plain


def revoke_key(connection, key_id: str, reason: str = "", actor: str | None = None) -> bool:
    with connection:
        cursor = connection.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                    (time.time(), key_id))
        if cursor.rowcount == 1:
            audit.append(connection, "key.revoke", f"key {key_id}", "active", "revoked", reason, actor)
    return cursor.rowcount == 1


def rotate_key(connection, key_id: str, grace_s: float, actor: str | None = None) -> str | None:
    """A new secret for the key, valid at once; the secrets it had stop working after grace_s.
    Returns the new plain secret, or None when there is no such active key."""
    now = time.time()
    with connection:
        found = connection.execute("SELECT 1 FROM keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone()
        if found is None:
            return None
        ends = now + grace_s
        connection.execute("UPDATE key_secrets SET expires_at = ? WHERE key_id = ? AND (expires_at IS NULL OR "
                           "expires_at > ?)", (ends, key_id, ends))
        plain = new_secret()
        connection.execute("INSERT INTO key_secrets VALUES (?, ?, ?, NULL)", (hash_key(plain), key_id, now))
        audit.append(connection, "key.rotate", f"key {key_id}", "old secret valid indefinitely",
                     f"old secret valid until {iso(ends)}; new secret issued", actor=actor)
    return plain


def list_keys(connection) -> list[ApiKey]:
    now = time.time()
    rows = connection.execute(
        "SELECT k.key_id, k.name, k.tier, k.scopes, k.created_at, k.expires_at, k.revoked_at, "
        "(SELECT COUNT(*) FROM key_secrets s WHERE s.key_id = k.key_id AND (s.expires_at IS NULL OR s.expires_at > ?)) "
        "FROM keys k ORDER BY k.created_at", (now,))
    return [ApiKey(r[0], r[1], r[2], tuple(r[3].split(",")), r[4], r[5], r[6], r[7]) for r in rows]


GRANT_QUERY = ("SELECT s.secret_hash, k.key_id, k.tier, k.scopes, k.expires_at, s.expires_at FROM key_secrets s "
               "JOIN keys k ON k.key_id = s.key_id WHERE k.revoked_at IS NULL")


def _grant(key_id: str, tier: str, scopes: str, key_ends: float | None, secret_ends: float | None) -> Grant:
    ends, ending = key_ends, "expired"
    if secret_ends is not None and (ends is None or secret_ends < ends):
        ends, ending = secret_ends, "rotated out"
    return Grant(key_id, tier, frozenset(scopes.split(",")), ends, ending)


def key_grants(connection) -> dict[str, Grant]:
    """secret hash -> Grant, for every secret of a key not revoked (expired ones too, so the service
    can say why it refuses them)."""
    return {row[0]: _grant(*row[1:]) for row in connection.execute(GRANT_QUERY)}


def key_grant(connection, secret_hash: str) -> Grant | None:
    """One secret's grant (a key made a moment ago, before the service's next reload)."""
    row = connection.execute(GRANT_QUERY + " AND s.secret_hash = ?", (secret_hash,)).fetchone()
    return _grant(*row[1:]) if row else None
