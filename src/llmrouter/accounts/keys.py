"""API keys: `lr-<id>_<secret><checksum>`, stored only as a hash.

The prefix makes a leaked key easy for secret scanners to find; the checksum (CRC32 of the rest, in
base62) lets both scanners and the server reject a mistyped or made-up key without a lookup. The id
is the row's primary key and names the key in counters and the ledger; the stored hash is sha256
of the whole key, compared in constant time. A key is random enough (190 bits) that a slow password
hash would add latency and no safety. Rotating a key keeps its id (its limits, spend and history)
and replaces the secret: the old one stops working at once.

A server keeps the keys it has seen for `cache_seconds`, to spare a database read per request,
but only while it hears of changes. On PostgreSQL a trigger on `api_keys` notifies every server of
any change to a key, in the changing transaction (any replica, the CLI, or SQL by hand), and each
forgets the key at once. SQLite has no notifications: a change made through llmrouter (any
process: a worker, the CLI, the dashboard) is announced in a marker file that every server checks
before each lookup (one `stat`), so it is in force at the next request; a change by SQL behind
llmrouter's back bumps a version (a trigger) that servers read each second. A lookup that was
under way when a key changed is not cached: it may have read the key as it was.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass, replace

import msgspec

from llmrouter.accounts.principal import UNLIMITED, Principal
from llmrouter.accounts.store import Database, IntegrityError
from llmrouter.errors import AuthenticationFailed
from llmrouter.settings import Policy

__all__ = ["KEY_PATTERN", "MAX_LABEL", "ApiKey", "KeyError_", "KeyNameTaken", "Keys", "check_label"]

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_CHARS, _SECRET_CHARS, _CHECK_CHARS = 12, 32, 6
PREFIX = "lr-"
KEY_PATTERN = re.compile(
    rf"^{PREFIX}(?P<id>[0-9A-Za-z]{{{_ID_CHARS}}})_(?P<body>[0-9A-Za-z]{{{_SECRET_CHARS}}})"
    rf"(?P<check>[0-9A-Za-z]{{{_CHECK_CHARS}}})$"
)
MAX_LABEL = 65536  # characters in a key's name or owner
_COLUMNS = "id, name, owner, created_at, expires_at, revoked_at, admin, policy"
_policy_decoder = msgspec.json.Decoder(Policy)


class KeyError_(Exception):
    """A key operation that cannot be done (no such key, name taken, bad value); one line."""


class KeyNameTaken(KeyError_):
    """A live key has this name already: the name is free again once that key is revoked."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    created_at: int
    revoked_at: int | None = None
    owner: str | None = None
    expires_at: int | None = None
    admin: bool = False
    policy: Policy = UNLIMITED

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(
            id=f"key:{self.id}",
            kind="key",
            name=self.name,
            limits=self.policy,
            owner=self.owner,
            admin=self.admin,
            key_id=self.id,
            expires_at=self.expires_at,
        )


def _from_row(row: tuple[object, ...]) -> ApiKey:
    id_, name, owner, created, expires, revoked, admin, policy = row
    return ApiKey(
        id=str(id_),
        name=str(name),
        created_at=int(created),  # type: ignore[call-overload]
        revoked_at=None if revoked is None else int(revoked),  # type: ignore[call-overload]
        owner=None if owner is None else str(owner),
        expires_at=None if expires is None else int(expires),  # type: ignore[call-overload]
        admin=bool(admin),
        policy=_policy_decoder.decode(str(policy)),
    )


def check_label(what: str, value: str) -> str:
    """Names and owners are kept exactly as given (quotes, SQL, control characters, any length
    up to MAX_LABEL); NUL alone is refused, since PostgreSQL text cannot hold it."""
    if not value.strip():
        raise KeyError_(f"a key's {what} must not be empty")
    if "\x00" in value:
        raise KeyError_(f"a key's {what} must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise KeyError_(f"a key's {what} must be valid Unicode (UTF-8)") from None
    if len(value) > MAX_LABEL:
        raise KeyError_(f"a key's {what} is longer than {MAX_LABEL} characters")
    return value


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


def _secret_for(key_id: str) -> str:
    unsigned = f"{PREFIX}{key_id}_{_random(_SECRET_CHARS)}"
    return unsigned + _checksum(unsigned)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


_CHANNEL = "llmrouter_keys"  # NOTIFY payload: the id of a key that changed
_CACHE_MAX = 100_000


class Keys:
    def __init__(self, db: Database, *, cache_seconds: float = 0.0) -> None:
        self._db = db
        self._cache_seconds = cache_seconds
        # sha256 of the secret -> (until, key, its principal)
        self._cache: dict[str, tuple[float, ApiKey, Principal]] = {}
        self._digests: dict[str, set[str]] = {}  # key id -> its cached digests
        self._forgotten = 0  # how many times anything was forgotten

    async def start(self) -> None:
        """Start caching, where the database can say when a key changes."""
        if self._cache_seconds > 0:
            await self._db.listen(_CHANNEL, self._forget)

    def _forget(self, key_id: str | None) -> None:
        """A key changed (None: anything may have, the notifications were interrupted)."""
        self._forgotten += 1
        if key_id is None:
            self._cache.clear()
            self._digests.clear()
            return
        for digest in self._digests.pop(key_id, ()):
            self._cache.pop(digest, None)

    def _keep(self, digest: str, key: ApiKey, until: float) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
            self._digests.clear()
        self._cache[digest] = (until, key, key.principal())
        self._digests.setdefault(key.id, set()).add(digest)

    async def create(
        self,
        name: str,
        *,
        owner: str | None = None,
        policy: Policy = UNLIMITED,
        expires_at: int | None = None,
        admin: bool = False,
    ) -> tuple[ApiKey, str]:
        """A new key; the secret is returned once and never stored."""
        check_label("name", name)
        if owner is not None:
            check_label("owner", owner)
        now = int(time.time())
        if expires_at is not None and expires_at <= now:
            raise KeyError_("the expiry must be in the future")
        key = ApiKey(_random(_ID_CHARS), name, now, None, owner, expires_at, admin, policy)
        secret = _secret_for(key.id)
        try:
            await self._db.execute(
                f"INSERT INTO api_keys ({_COLUMNS}, secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                key.id,
                name,
                owner,
                now,
                expires_at,
                None,
                admin,
                msgspec.json.encode(policy).decode(),
                _hash(secret),
            )
        except IntegrityError:
            raise KeyNameTaken("a live key with this name exists already") from None
        return key, secret

    async def page(self, after: tuple[int, str] | None = None, limit: int = 50) -> list[ApiKey]:
        """Up to `limit` keys (revoked ones too) in the order they were made, after the key made
        at `after` (its created_at and id): the dashboard's list, a page at a time."""
        where = ""
        args: tuple[object, ...] = ()
        if after is not None:
            where = " WHERE created_at > ? OR (created_at = ? AND id > ?)"
            args = (after[0], after[0], after[1])
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id LIMIT ?",  # noqa: S608
            *args,
            limit,
        )
        return [_from_row(row) for row in rows]

    async def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, id"  # noqa: S608
        )
        return [_from_row(row) for row in rows]

    async def names(self, ids: Collection[str]) -> dict[str, str]:
        """Id -> name for these keys (revoked too; an id of no key is left out)."""
        out: dict[str, str] = {}
        wanted = sorted(ids)
        for i in range(0, len(wanted), 500):  # (a statement's parameters are bounded)
            chunk = wanted[i : i + 500]
            rows = await self._db.fetchall(
                f"SELECT id, name FROM api_keys WHERE id IN ({', '.join('?' * len(chunk))})",  # noqa: S608
                *chunk,
            )
            out.update((str(r[0]), str(r[1])) for r in rows)
        return out

    async def count(self) -> int:
        row = await self._db.fetchone("SELECT count(*) FROM api_keys")
        return int(row[0]) if row else 0

    async def get(self, id_or_name: str, *, live: bool = True) -> ApiKey:
        """A key by id, or a live key by name."""
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?",  # noqa: S608
            id_or_name,
        )
        if row is None:
            row = await self._db.fetchone(
                f"SELECT {_COLUMNS} FROM api_keys WHERE name = ? AND revoked_at IS NULL",  # noqa: S608
                id_or_name,
            )
        if row is None or (live and row[5] is not None):
            raise KeyError_("no live key with this id or name")
        return _from_row(row)

    async def revoke(self, id_or_name: str) -> ApiKey:
        key = await self.get(id_or_name)
        now = int(time.time())
        await self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", now, key.id
        )
        self._forget(key.id)  # here at once; elsewhere when they hear of it
        self._db.changed(_CHANNEL)
        await self._end_sessions(key.id)
        return replace(key, revoked_at=now)

    async def _end_sessions(self, key_id: str) -> None:
        """The dashboard's sessions its secret opened end with it (a rotation is how a leaked
        admin secret is locked out: a session made with it must not outlive it)."""
        await self._db.execute("DELETE FROM admin_sessions WHERE key_id = ?", key_id)

    async def update(self, id_or_name: str, *, policy: Policy) -> ApiKey:
        """New limits for a live key, in force at once here (and, on PostgreSQL, on every server
        when the change's notification arrives)."""
        key = await self.get(id_or_name)
        changed = await self._db.execute(
            "UPDATE api_keys SET policy = ? WHERE id = ? AND revoked_at IS NULL",
            msgspec.json.encode(policy).decode(),
            key.id,
        )
        if not changed:
            raise KeyError_("no live key with this id or name")
        self._forget(key.id)
        self._db.changed(_CHANNEL)
        return replace(key, policy=policy)

    async def rotate(self, id_or_name: str) -> tuple[ApiKey, str]:
        """A new secret for the same key; the old secret stops working now."""
        key = await self.get(id_or_name)
        secret = _secret_for(key.id)
        changed = await self._db.execute(
            "UPDATE api_keys SET secret_hash = ? WHERE id = ? AND revoked_at IS NULL",
            _hash(secret),
            key.id,
        )
        if not changed:
            raise KeyError_("no live key with this id or name")
        self._forget(key.id)
        self._db.changed(_CHANNEL)
        await self._end_sessions(key.id)
        return key, secret

    async def authenticate(self, token: str) -> Principal:
        """The principal for a bearer token shaped like a key, or AuthenticationFailed (401)."""
        match = KEY_PATTERN.match(token)
        if match is None:
            raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        digest = _hash(token)
        now = time.time()
        self._db.poll()
        cached = self._cache.get(digest) if self._db.listening else None
        if cached is not None and cached[0] > now:  # (its hash is an issued key's: checked then)
            key = cached[1]
            if key.expires_at is None or key.expires_at > now:  # (a cached key is not revoked)
                return cached[2]
        else:
            # A typo or a made-up key is refused here, without a read of the store.
            if not hmac.compare_digest(_checksum(token[:-_CHECK_CHARS]), match.group("check")):
                raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
            forgotten = self._forgotten
            key = await self._lookup(match.group("id"), digest)
            # Not if a notification came meanwhile: this read may be older than that change.
            self._db.poll()
            if self._db.listening and forgotten == self._forgotten and key.revoked_at is None:
                self._keep(digest, key, now + self._cache_seconds)
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        return key.principal()

    async def _lookup(self, key_id: str, digest: str) -> ApiKey:
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS}, secret_hash FROM api_keys WHERE id = ?",  # noqa: S608
            key_id,
        )
        if row is None or not hmac.compare_digest(str(row[-1]), digest):
            raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        return _from_row(row[:-1])
