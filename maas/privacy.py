"""Privacy of what the prediction log keeps: per-column policies applied to a request's rows before
they are written anywhere (the service's journal included), and the retention purge.

Policies, after Microsoft Presidio's anonymizers: keep; drop; hash (HMAC-SHA256 under a secret salt,
so equal values still match each other but a dictionary of likely values cannot be hashed to find
them without the salt); mask (all but the last 4 characters); encrypt (AES-256-GCM, authenticated,
under a key only the owner holds; a Fernet key's 32 bytes, so Fernet.generate_key() makes one.
Fernet itself cost 11 us a value here against 2 us, on every logged request). Secrets come from the
environment, never from the config file or MLflow params.
The monitor measures drift on the kept columns only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import orjson

from maas.config import PrivacyConfig
from maas.errors import MaasInputError

HASH_PREFIX, ENCRYPTED_PREFIX = "hmac:", "aesgcm:"
NONCE_BYTES = 12
MASK_KEEP = 4


def _text(value) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class LogRedactor:
    """Applies a PrivacyConfig to request bodies ({"rows": [...]}) on their way to the log."""

    def __init__(self, privacy: PrivacyConfig, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.privacy = privacy
        self.columns = dict(privacy.columns)
        self.changed = [(column, policy) for column, policy in self.columns.items() if policy != "keep"]
        used = set(self.columns.values()) | {privacy.default}
        salt = self._secret(environ, privacy.hash_salt_env, "hash").encode() if "hash" in used else b""
        self.keyed_hash = hmac.new(salt, digestmod=hashlib.sha256)  # copied per value: keyed once
        self.cipher = None
        if "encrypt" in used:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            key = self._secret(environ, privacy.encryption_key_env, "encrypt")
            try:
                raw = base64.urlsafe_b64decode(key.encode())
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise MaasInputError(f"${privacy.encryption_key_env}: not 32 url-safe base64-encoded bytes (make one "
                                     "with cryptography.fernet.Fernet.generate_key())")
            self.cipher = AESGCM(raw)

    @staticmethod
    def _secret(environ, name: str, policy: str) -> str:
        value = environ.get(name, "")
        if len(value) < 16:
            raise MaasInputError(f"serving.privacy: the '{policy}' policy needs a secret of 16+ characters in "
                                 f"${name} ({'unset' if not value else 'too short'})")
        return value

    def value(self, policy: str, value):
        if value is None or policy == "keep":
            return value
        if policy == "hash":
            keyed = self.keyed_hash.copy()
            keyed.update(_text(value).encode())
            return HASH_PREFIX + keyed.hexdigest()[:32]
        if policy == "mask":
            text = _text(value)
            hidden = len(text) if len(text) <= MASK_KEEP else len(text) - MASK_KEEP
            return "*" * hidden + text[hidden:]
        nonce = os.urandom(NONCE_BYTES)
        return ENCRYPTED_PREFIX + base64.urlsafe_b64encode(nonce + self.cipher.encrypt(nonce, orjson.dumps(value), None)).decode()

    def row(self, row: dict) -> dict:
        if self.privacy.default == "keep":  # the usual case: touch only the named columns
            kept = dict(row)
            for column, policy in self.changed:
                if column in kept:
                    if policy == "drop":
                        del kept[column]
                    else:
                        kept[column] = self.value(policy, kept[column])
            return kept
        policy_of, default = self.columns.get, self.privacy.default
        return {column: self.value(policy_of(column, default), value) for column, value in row.items()
                if policy_of(column, default) != "drop"}

    def body(self, body: bytes) -> bytes:
        """The logged request body with every row's columns under their policy."""
        rows = orjson.loads(body)["rows"]
        return orjson.dumps({"rows": [self.row(row) if isinstance(row, dict) else row for row in rows]})

    def decrypt(self, token: str):
        """An encrypted value back, for the owner of the key (e.g. to answer a subject access request);
        a changed token fails authentication (cryptography's InvalidTag)."""
        sealed = base64.urlsafe_b64decode(token.removeprefix(ENCRYPTED_PREFIX).encode())
        return orjson.loads(self.cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], None))


def redactor_for(privacy: PrivacyConfig) -> LogRedactor | None:
    return LogRedactor(privacy) if privacy.active else None


def purge_predictions(connection, retention_days: float, now: float | None = None, actor: str | None = None) -> int:
    """Delete logged inputs older than the retention period; usage (and so bills) stays. Audited."""
    from maas import audit

    cutoff = (now or time.time()) - retention_days * 86_400
    with connection:
        purged = connection.execute("DELETE FROM predictions WHERE logged_at < ?", (cutoff,)).rowcount
        if purged:
            audit.append(connection, "log.purge", "prediction log", f"{purged} logged request(s) older than "
                         f"{retention_days:g} days", "deleted", f"retention {retention_days:g} days", actor)
    return purged
