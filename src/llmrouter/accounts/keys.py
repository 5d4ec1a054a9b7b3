"""API keys: `lr-<id>_<secret><checksum>`, stored only as a hash.

The prefix makes a leaked key easy for secret scanners to find; the checksum (CRC32 of the rest, in
base62) lets both scanners and the server reject a mistyped or made-up key without a lookup. The id
is the row's primary key; the stored hash is sha256 of the whole key, compared in constant time.
A key is random enough (190 bits) that a slow password hash would add latency and no safety.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
import zlib
from dataclasses import dataclass

from llmrouter.accounts.store import Store
from llmrouter.errors import AuthenticationFailed

__all__ = ["KEY_PATTERN", "ApiKey", "KeyError_", "Keys", "Principal"]

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_CHARS, _SECRET_CHARS, _CHECK_CHARS = 12, 32, 6
PREFIX = "lr-"
KEY_PATTERN = re.compile(
    rf"^{PREFIX}(?P<id>[0-9A-Za-z]{{{_ID_CHARS}}})_(?P<body>[0-9A-Za-z]{{{_SECRET_CHARS}}})"
    rf"(?P<check>[0-9A-Za-z]{{{_CHECK_CHARS}}})$"
)


class KeyError_(Exception):
    """A key operation the CLI cannot do (no such key, name taken); said in one line."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling."""

    key_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    created_at: int
    revoked_at: int | None


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def _checksum(text: str) -> str:
    return _base62(zlib.crc32(text.encode()), _CHECK_CHARS)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    def __init__(self, store: Store) -> None:
        self._db = store.db

    def create(self, name: str) -> tuple[ApiKey, str]:
        """A new key; the secret is returned once and never stored."""
        if not name.strip():
            raise KeyError_("a key needs a non-empty name")
        key_id = _random(_ID_CHARS)
        unsigned = f"{PREFIX}{key_id}_{_random(_SECRET_CHARS)}"
        secret = unsigned + _checksum(unsigned)
        now = int(time.time())
        try:
            self._db.execute(
                "INSERT INTO api_keys (id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                (key_id, name, _hash(secret), now),
            )
        except sqlite3.IntegrityError:
            raise KeyError_(f"a live key named {name!r} exists already") from None
        return ApiKey(key_id, name, now, None), secret

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self._db.execute(
            f"SELECT id, name, created_at, revoked_at FROM api_keys{where} ORDER BY created_at, id"  # noqa: S608
        ).fetchall()
        return [ApiKey(*row) for row in rows]

    def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM api_keys").fetchone()
        return int(n)

    def revoke(self, id_or_name: str) -> ApiKey:
        row = self._db.execute(
            "SELECT id, name, created_at, revoked_at FROM api_keys "
            "WHERE revoked_at IS NULL AND (id = ? OR name = ?)",
            (id_or_name, id_or_name),
        ).fetchone()
        if row is None:
            raise KeyError_(f"no live key with id or name {id_or_name!r}")
        now = int(time.time())
        self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now, row[0]))
        return ApiKey(row[0], row[1], row[2], now)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `Authorization` header, or AuthenticationFailed (401)."""
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer lr-...'.",
                code="missing_api_key",
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key"
            )
        match = KEY_PATTERN.match(key)
        if match is None or not hmac.compare_digest(
            _checksum(key[:-_CHECK_CHARS]), match.group("check")
        ):
            raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        row = self._db.execute(
            "SELECT name, secret_hash, revoked_at FROM api_keys WHERE id = ?", (match.group("id"),)
        ).fetchone()
        if row is None or not hmac.compare_digest(row[1], _hash(key)):
            raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        if row[2] is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        return Principal(match.group("id"), row[0])
