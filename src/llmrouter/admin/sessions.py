"""Login sessions: an admin key exchanged for a random id, kept in the store so that every worker
and replica knows it. The cookie holds only the id; the store holds only its hash (a copy of the
table gives no one a session), the admin key's id, the session's CSRF token and its expiry."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from llmrouter.accounts.store import Database

__all__ = ["COOKIE", "Session", "Sessions", "session_cookie"]

COOKIE = "llmrouter_session"


def session_cookie(path: str, value: str, max_age: int, *, secure: bool) -> str:
    """The Set-Cookie value: only for the dashboard's path, out of scripts' reach, never sent
    with a request another site starts, and over TLS only when the page came over TLS."""
    flags = "; Secure" if secure else ""
    return f"{COOKIE}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{flags}"


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    key_id: str
    csrf: str
    expires_at: int


class Sessions:
    def __init__(self, db: Database, *, seconds: float) -> None:
        self._db = db
        self._seconds = int(seconds)

    @property
    def seconds(self) -> int:
        return self._seconds

    async def create(self, key_id: str) -> tuple[str, Session]:
        """A new session for the key: its id (for the cookie, never stored) and the session."""
        now = int(time.time())
        # The expired ones go here: a login is rare, and so the table stays small.
        await self._db.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", now)
        session_id = secrets.token_urlsafe(32)
        session = Session(key_id, secrets.token_urlsafe(32), now + self._seconds)
        await self._db.execute(
            "INSERT INTO admin_sessions (id_hash, key_id, csrf, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            _hash(session_id),
            key_id,
            session.csrf,
            now,
            session.expires_at,
        )
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or None (unknown, expired or logged out)."""
        if not session_id or len(session_id) > 128:
            return None
        row = await self._db.fetchone(
            "SELECT key_id, csrf, expires_at FROM admin_sessions WHERE id_hash = ? AND expires_at > ?",
            _hash(session_id),
            int(time.time()),
        )
        return None if row is None else Session(str(row[0]), str(row[1]), int(row[2]))

    async def delete(self, session_id: str) -> None:
        await self._db.execute("DELETE FROM admin_sessions WHERE id_hash = ?", _hash(session_id))
