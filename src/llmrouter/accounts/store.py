"""The embedded store: one SQLite file under LLMROUTER_HOME, with versioned migrations.

Reads on the request path are single indexed lookups on a connection opened in WAL mode, so the
CLI (another process) can add or revoke keys while servers run, and they see it at the next request.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["MIGRATIONS", "Store", "StoreError"]

# Each entry moves the schema from version i to i + 1. Never edit one that has shipped; append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE api_keys (
            id          TEXT PRIMARY KEY,      -- the public part of the key
            name        TEXT NOT NULL,
            secret_hash TEXT NOT NULL,         -- sha256 of the whole key, hex
            created_at  INTEGER NOT NULL,      -- unix seconds
            revoked_at  INTEGER                -- null while the key is valid
        )""",
        "CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL",
    ),
)


class StoreError(Exception):
    """The store cannot be opened or migrated; the message names the file."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from None

    @classmethod
    def in_home(cls, home: Path) -> Store:
        return cls(home / "llmrouter.sqlite3")

    def _migrate(self) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this llmrouter knows "
                f"({len(MIGRATIONS)}); upgrade llmrouter"
            )
        for target in range(version + 1, len(MIGRATIONS) + 1):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                (current,) = self.db.execute("PRAGMA user_version").fetchone()
                if current < target:  # another process may have migrated meanwhile
                    for statement in MIGRATIONS[target - 1]:
                        self.db.execute(statement)
                    self.db.execute(f"PRAGMA user_version = {target}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def is_open(self) -> bool:
        try:
            self.db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        self.db.close()
