"""The store: keys and the usage ledger, in SQLite (embedded) or PostgreSQL (shared by replicas).

One small async interface over both, with SQL written once using `?` placeholders (PostgreSQL gets
`$1, $2...`). Schema changes are versioned migrations, applied at open by whichever process comes
first; each dialect has its own text for the same version.

SQLite: reads run on the event loop's own connection (an indexed lookup takes microseconds, less
than a hop to a thread); writes run on a second connection in one writer thread, so that a commit's
fsync never stalls the loop. A batch of rows goes to SQLite as multi-row `VALUES` statements, a
few rows a statement while the loop is idle and the rest in one statement once it is busy (see
`_ROWS_A_STEP`), so the writer thread spends its time inside SQLite, where it does not hold the GIL
the event loop needs. WAL mode lets readers and the writer (and the CLI, another process)
work at once. PostgreSQL: an asyncpg pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from llmrouter.accounts.journal import replay

__all__ = [
    "MIGRATIONS",
    "ROLLUP_BOUNDS_MS",
    "DataRejected",
    "Database",
    "IntegrityError",
    "Migration",
    "StoreError",
    "open_database",
    "rollup_order",
]

Row = tuple[Any, ...]
log = logging.getLogger("llmrouter.store")


@dataclass(frozen=True, slots=True)
class Migration:
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


_KEYS_V1 = """CREATE TABLE api_keys (
            id          TEXT PRIMARY KEY,      -- the public part of the key
            name        TEXT NOT NULL,
            secret_hash TEXT NOT NULL,         -- sha256 of the whole key, hex
            created_at  INTEGER NOT NULL,      -- unix seconds
            revoked_at  INTEGER                -- null while the key is valid
        )"""  # as shipped in SQLite; PostgreSQL's integers are 64-bit (BIGINT) below
_KEYS_V2 = (
    "ALTER TABLE api_keys ADD COLUMN owner TEXT",
    "ALTER TABLE api_keys ADD COLUMN expires_at BIGINT",
    "ALTER TABLE api_keys ADD COLUMN admin BOOLEAN NOT NULL DEFAULT FALSE",
    # The key's limits: a JSON object of the Policy's fields (models included).
    "ALTER TABLE api_keys ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'",
)
_LEDGER = """CREATE TABLE ledger (
    request_id        TEXT PRIMARY KEY,   -- idempotent: a record is written at most once
    principal         TEXT NOT NULL,      -- key:<id> | jwt:<issuer> <subject> | '' (unauthenticated)
    end_user          TEXT,               -- the request's `user`, JSON-encoded (any character survives)
    metadata          TEXT,               -- the request's `metadata`, JSON
    model_requested   TEXT NOT NULL,
    model             TEXT,               -- the model and provider that answered
    provider          TEXT,
    attempts          TEXT NOT NULL,      -- JSON list: "provider/model outcome 12ms"
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost              DOUBLE PRECISION NOT NULL,  -- currency, from the answering deployment's prices
    latency_ms        DOUBLE PRECISION NOT NULL,
    ttft_ms           DOUBLE PRECISION,   -- streams: until the first content part was sent
    status            INTEGER NOT NULL,   -- the HTTP status; 499 when the client left
    error             TEXT,               -- the error's code, if any
    finish_reason     TEXT,
    stream            BOOLEAN NOT NULL,
    created_at        DOUBLE PRECISION NOT NULL,  -- unix seconds
    finished_at       DOUBLE PRECISION NOT NULL
)"""
_LEDGER_ROUTE = "ALTER TABLE ledger ADD COLUMN route TEXT NOT NULL DEFAULT 'completions'"
_LEDGER_INDEXES = (
    "CREATE INDEX ledger_principal_time ON ledger (principal, created_at)",
    "CREATE INDEX ledger_time ON ledger (created_at)",
)

# PostgreSQL: every change to a key notifies the servers that cache keys, in the changing
# transaction (the notification is delivered when it commits, and only if it does).
_KEY_CHANGED = (
    """CREATE FUNCTION llmrouter_key_changed() RETURNS trigger AS $$
    BEGIN
        PERFORM pg_notify('llmrouter_keys', OLD.id);
        RETURN NULL;
    END $$ LANGUAGE plpgsql""",
    "CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON api_keys "
    "FOR EACH ROW EXECUTE FUNCTION llmrouter_key_changed()",
)

_KEY_VERSION = (
    "CREATE TABLE key_changes (version INTEGER NOT NULL)",
    "INSERT INTO key_changes VALUES (0)",
    "CREATE TRIGGER api_keys_updated AFTER UPDATE ON api_keys "
    "BEGIN UPDATE key_changes SET version = version + 1; END",
    "CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys "
    "BEGIN UPDATE key_changes SET version = version + 1; END",
)

# Version 4: the dashboard's hourly rollup of the ledger, its login sessions, and the prompt and
# answer texts (kept only when `accounts.store_prompts` is on).
#
# The rollup is kept by a trigger on the ledger, in the writer's own transaction, once per
# inserted record (the ledger's insert skips a duplicate with ON CONFLICT DO NOTHING, which fires
# no row trigger), so its sums are the ledger's exactly and no chart reads the ledger itself.
# Latency and time to first token are counted in fixed buckets (upper bounds in ms; the last is
# everything above), from which the pages interpolate percentiles as Prometheus does. These
# bounds are part of the shipped schema: never change them.
ROLLUP_BOUNDS_MS: tuple[float, ...] = (
    25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000
)  # fmt: skip
_ROLLUP_KEY = ("hour", "principal", "model", "provider", "outcome")
# The ledger's columns, in the order its writers (and its journal files) give them.
LEDGER_COLUMNS = (
    "request_id",
    "principal",
    "end_user",
    "metadata",
    "model_requested",
    "model",
    "provider",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_ms",
    "ttft_ms",
    "status",
    "error",
    "finish_reason",
    "stream",
    "created_at",
    "finished_at",
    "route",
    "prompt_text",
    "answer_text",
)

UNKNOWN_MODEL = "(unknown model)"  # the rollup's model for requests naming no model here


def rollup_order(row: Sequence[Any]) -> tuple[float, str, str, str, str]:
    """A ledger row's (in `LEDGER_COLUMNS`' order) rollup row, as its trigger keys it, to order a
    batch by: rows of one rollup row sort together, and rollup rows in one total order, so that
    two writers on one PostgreSQL (replicas, or a replay beside a live writer) take the rollup
    rows' locks in the same order and never deadlock. Any value sorts (a journaled row is
    checked only by the insert)."""
    created, error = row[_CREATED_AT], row[_ERROR]
    hour = created // 3600 if isinstance(created, int | float) and math.isfinite(created) else 0.0
    model = UNKNOWN_MODEL if error == "model_not_found" else (row[_MODEL] or row[_MODEL_REQUESTED])
    return hour, str(row[_PRINCIPAL]), str(model or ""), str(row[_PROVIDER] or ""), str(error or "")


_CREATED_AT, _ERROR, _MODEL, _MODEL_REQUESTED, _PRINCIPAL, _PROVIDER = (
    LEDGER_COLUMNS.index(c)
    for c in ("created_at", "error", "model", "model_requested", "principal", "provider")
)
_ROLLUP_SUMS = (
    "requests", "errors", "fallbacks", "prompt_tokens", "completion_tokens", "cost",
    "latency_ms_sum", "ttft_count", "ttft_ms_sum",
    *(f"latency_b{i}" for i in range(len(ROLLUP_BOUNDS_MS) + 1)),
    *(f"ttft_b{i}" for i in range(len(ROLLUP_BOUNDS_MS) + 1)),
)  # fmt: skip
_ROLLUP_FLOATS = ("cost", "latency_ms_sum", "ttft_ms_sum")
_ROLLUP = f"""CREATE TABLE usage_hourly (
    hour      BIGINT NOT NULL,   -- unix seconds at the start of the hour (UTC) of created_at
    principal TEXT NOT NULL,
    model     TEXT NOT NULL,     -- the model that answered, else the one asked for
    provider  TEXT NOT NULL,     -- '' when none answered
    outcome   TEXT NOT NULL,     -- the record's error code; '' for success
    {", ".join(f"{c} BIGINT NOT NULL" for c in _ROLLUP_SUMS if c not in _ROLLUP_FLOATS)},
    cost DOUBLE PRECISION NOT NULL, latency_ms_sum DOUBLE PRECISION NOT NULL,
    ttft_ms_sum DOUBLE PRECISION NOT NULL,
    PRIMARY KEY ({", ".join(_ROLLUP_KEY)})
)"""


def _buckets(column: str) -> list[str]:
    """One 0/1 per bucket: is `column` (ms, NULL counts nowhere) in it."""
    bounds = ROLLUP_BOUNDS_MS
    cases = [f"CASE WHEN {column} <= {bounds[0]} THEN 1 ELSE 0 END"]
    cases += [
        f"CASE WHEN {column} > {lo} AND {column} <= {hi} THEN 1 ELSE 0 END"
        for lo, hi in itertools.pairwise(bounds)
    ]
    cases.append(f"CASE WHEN {column} > {bounds[-1]} THEN 1 ELSE 0 END")
    return cases


def _rollup_values(row: str, hour: str, attempts: str) -> list[str]:
    """A ledger row's contribution to its rollup row: key columns then sums (one record)."""
    return [
        hour,
        f"{row}principal",
        # A name that is no model here is the client's to choose: one group for them all (the
        # ledger keeps each), so that no client can grow the pages' groups.
        f"CASE WHEN {row}error = 'model_not_found' THEN '{UNKNOWN_MODEL}' "
        f"ELSE coalesce({row}model, {row}model_requested) END",
        f"coalesce({row}provider, '')",
        f"coalesce({row}error, '')",
        "1",
        f"CASE WHEN {row}status >= 400 OR {row}error IS NOT NULL THEN 1 ELSE 0 END",
        f"CASE WHEN {attempts} > 1 THEN 1 ELSE 0 END",
        f"{row}prompt_tokens",
        f"{row}completion_tokens",
        f"{row}cost",
        f"{row}latency_ms",
        f"CASE WHEN {row}ttft_ms IS NULL THEN 0 ELSE 1 END",
        f"coalesce({row}ttft_ms, 0)",
        *_buckets(f"{row}latency_ms"),
        *_buckets(f"{row}ttft_ms"),
    ]


def _rollup_sql(dialect: Literal["sqlite", "postgres"]) -> tuple[str, ...]:
    columns = ", ".join((*_ROLLUP_KEY, *_ROLLUP_SUMS))
    if dialect == "sqlite":
        hour = "CAST(NEW.created_at / 3600 AS INTEGER) * 3600"
        attempts = "json_array_length(NEW.attempts)"
        backfill_hour, backfill_attempts = hour.replace("NEW.", ""), "json_array_length(attempts)"
    else:
        hour = "(floor(NEW.created_at / 3600) * 3600)::bigint"
        attempts = "json_array_length(NEW.attempts::json)"
        backfill_hour = hour.replace("NEW.", "")
        backfill_attempts = "json_array_length(attempts::json)"
    values = ", ".join(_rollup_values("NEW.", hour, attempts))
    add = ", ".join(f"{c} = usage_hourly.{c} + excluded.{c}" for c in _ROLLUP_SUMS)
    upsert = (
        f"INSERT INTO usage_hourly ({columns}) VALUES ({values}) "  # noqa: S608
        f"ON CONFLICT ({', '.join(_ROLLUP_KEY)}) DO UPDATE SET {add}"
    )
    # The records written before this migration, summed once.
    one = _rollup_values("", backfill_hour, backfill_attempts)
    sums = ", ".join(one[:5] + [f"sum({v})" for v in one[5:]])
    backfill = (
        f"INSERT INTO usage_hourly ({columns}) SELECT {sums} FROM ledger "  # noqa: S608
        "GROUP BY 1, 2, 3, 4, 5"
    )
    trigger: tuple[str, ...]
    if dialect == "sqlite":
        trigger = (f"CREATE TRIGGER ledger_rollup AFTER INSERT ON ledger BEGIN {upsert}; END",)
    else:
        trigger = (
            f"""CREATE FUNCTION llmrouter_ledger_rollup() RETURNS trigger AS $$
    BEGIN
        {upsert};
        RETURN NULL;
    END $$ LANGUAGE plpgsql""",
            "CREATE TRIGGER ledger_rollup AFTER INSERT ON ledger "
            "FOR EACH ROW EXECUTE FUNCTION llmrouter_ledger_rollup()",
        )
    return (_ROLLUP, backfill, *trigger)


_SESSIONS = """CREATE TABLE admin_sessions (
    id_hash    TEXT PRIMARY KEY,   -- sha256 of the cookie's random id, hex (the id is not kept)
    key_id     TEXT NOT NULL,      -- the admin key that logged in
    csrf       TEXT NOT NULL,      -- the token every form of the session carries
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
)"""
_V4_LEDGER = (
    "ALTER TABLE ledger ADD COLUMN prompt_text TEXT",
    "ALTER TABLE ledger ADD COLUMN answer_text TEXT",
    # The request log's filters, each newest first within its value.
    "CREATE INDEX ledger_model_time ON ledger ((coalesce(model, model_requested)), created_at)",
    "CREATE INDEX ledger_provider_time ON ledger (provider, created_at)",
    "CREATE INDEX ledger_status_time ON ledger (status, created_at)",
    # The failed requests (the predicate is the log's, word for word, so the planner uses it).
    "CREATE INDEX ledger_failed_time ON ledger (created_at) WHERE (status >= 400 OR error IS NOT NULL)",
    "CREATE INDEX usage_hourly_hour ON usage_hourly (hour)",
    _SESSIONS,
    "CREATE INDEX admin_sessions_expiry ON admin_sessions (expires_at)",
    "CREATE INDEX admin_sessions_key ON admin_sessions (key_id)",  # ended with their key
    "CREATE INDEX api_keys_created ON api_keys (created_at, id)",  # the keys page's order
)

# Each entry moves the schema from version i to i + 1. Never edit one that has shipped; append.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        sqlite=(
            _KEYS_V1,
            "CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL",
        ),
        # A btree entry holds at most ~2.7 kB: names of any length are indexed by their hash.
        postgres=(
            _KEYS_V1.replace("INTEGER", "BIGINT"),
            "CREATE UNIQUE INDEX api_keys_live_name ON api_keys (md5(name)) WHERE revoked_at IS NULL",
        ),
    ),
    Migration(
        sqlite=(*_KEYS_V2, _LEDGER, *_LEDGER_INDEXES),
        postgres=(*_KEYS_V2, _LEDGER, *_LEDGER_INDEXES, *_KEY_CHANGED),
    ),
    # The API a request came in on (the records before it: all /completions).
    Migration(sqlite=(_LEDGER_ROUTE,), postgres=(_LEDGER_ROUTE,)),
    Migration(
        sqlite=(*_rollup_sql("sqlite"), *_V4_LEDGER),
        # No record may land between the backfill and the trigger (another replica, still on
        # the release before, writing): the ledger's writers wait for this migration.
        postgres=(
            "LOCK TABLE ledger IN SHARE ROW EXCLUSIVE MODE",
            *_rollup_sql("postgres"),
            *_V4_LEDGER,
        ),
    ),
    # SQLite: a version of the keys that any change to one bumps, for the servers that cache
    # keys (PostgreSQL notifies them instead, since version 2).
    Migration(sqlite=_KEY_VERSION, postgres=()),
)


class StoreError(Exception):
    """The store cannot be opened, migrated or reached; the message names it."""


class DataRejected(StoreError):
    """The database refused the data itself (a constraint, a value it cannot hold): trying the
    same write again cannot succeed."""


class IntegrityError(DataRejected):
    """A uniqueness constraint refused a write."""


class Database(Protocol):
    dialect: Literal["sqlite", "postgres"]
    where: str  # for messages: the file, or the server without credentials
    journal_folder: Path  # where the ledger's journal files of this database are

    async def fetchone(self, sql: str, *args: Any, heavy: bool = False) -> Row | None:
        """One row. `heavy`: the query may scan many rows (a sum over the ledger), so SQLite
        runs it in a thread of its own rather than on the event loop."""

    async def fetchall(self, sql: str, *args: Any, heavy: bool = False) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str
    ) -> None:
        """Insert `rows` in one durable transaction, skipping any whose `key` column already
        holds the value (the ledger's group commit; retrying a batch never doubles a row)."""

    async def ping(self) -> bool: ...

    @property
    def listening(self) -> bool:
        """Notifications (`listen`) are being received now."""

    async def listen(self, channel: str, on_message: Callable[[str | None], None]) -> None:
        """Call `on_message(payload)` for each notification on `channel`, and `on_message(None)`
        when the listening connection is lost or made again (what was learnt may be stale)."""

    def poll(self) -> None:
        """Hear now what changed since (SQLite, which has no notifications, checks here)."""

    def changed(self, channel: str) -> None:
        """Tell the other processes that listen on `channel` that something changed (after the
        change has committed). PostgreSQL's triggers do it themselves."""

    async def aclose(self) -> None: ...


async def open_database(
    url: str | None, home: Path, *, schema: str | None = None, sync: str = "full"
) -> Database:
    """SQLite under `home` when `url` is None (or `sqlite:///path`), else PostgreSQL. `sync`:
    SQLite's synchronous mode for writes (`full` or `normal`). The records that stopped
    processes left in the ledger's journal (journal.py) are put into it before it is returned."""
    db: SqliteDatabase | PostgresDatabase
    if url is None or url.startswith("sqlite:"):
        path = home / "llmrouter.sqlite3" if url is None else Path(url.removeprefix("sqlite://"))
        db = SqliteDatabase(path, sync=sync)
    elif url.startswith(("postgres://", "postgresql://")):
        db = await PostgresDatabase.connect(url, schema=schema)
        place = hashlib.sha256(f"{db.where}\n{schema or ''}".encode()).hexdigest()[:16]
        db.journal_folder = home / "journal" / f"postgres-{place}"
    else:
        raise StoreError("database_url must start with postgresql:// or sqlite://")
    try:
        await replay(
            db.journal_folder,
            db,
            table="ledger",
            columns=LEDGER_COLUMNS,
            key="request_id",
            order=rollup_order,
        )
    except StoreError:
        await db.aclose()
        raise
    except OSError as exc:
        await db.aclose()
        raise StoreError(f"cannot read the ledger's journal in {db.journal_folder}: {exc}") from None
    return db


# -- SQLite ---------------------------------------------------------------------------------------


# A batch is inserted a few rows a statement, all in one transaction, and the writer thread gives
# up its core between two statements (`sched_yield`): a whole batch's CPU at once (5-7 ms for 90
# records) held the core a request's wake-ups had gone to, on a machine with few cores, and put
# those milliseconds into the c1 p99 (bench/README.md, 2026-12-03). A step of 8 rows is about
# 0.4 ms; the thread keeps its fair share of the CPU (unlike SCHED_IDLE, which a busy machine
# starves while it holds the write lock). But the write lock is held from the first step to the
# commit, so the steps may not wait long: each takes the GIL back, which a busy event loop holds
# for up to the switch interval (5 ms), and each yield may give the core to a busy process (another
# worker, on the same file) for a whole time slice. Once a step has waited more than `_STEP_WAIT_S`
# beyond its own CPU, or the steps more than `_WAIT_S` in all, the rest of the batch goes in one
# statement, as every batch did before (stepping on cost 17 % more CPU a request at c64 and held the
# lock ten times as long). At c1 a yield waits some 0.1 ms (the request's own wake-ups run: what
# the yield is for), a batch of 16 steps 1.7 ms in all.
_ROWS_A_STEP = 8
_STEP_WAIT_S = 0.001
_WAIT_S = 0.005
_MOST_ROWS = 1024  # a statement's rows at most (and a power of two)


def _statements(rows: int, most: int) -> list[int]:
    """The row counts of the statements that insert `rows`, each at most `most` (a power of
    two): up to a step's rows (`_ROWS_A_STEP`) in one, more in powers of two, the largest first.
    So few distinct statement texts are ever prepared (15 at most: SQLite's statement cache keeps
    each, and one of hundreds of rows takes megabytes), and a batch of n rows takes about log2(n)
    statements."""
    counts: list[int] = []
    while rows > min(_ROWS_A_STEP, most):
        top = min(most, 1 << (rows.bit_length() - 1))
        counts.append(top)
        rows -= top
    if rows:
        counts.append(rows)
    return counts


def _insert_values(
    table: str, columns: tuple[str, ...], key: str, db: sqlite3.Connection, rows: Sequence[Sequence[Any]]
) -> None:
    """`rows` inserted by multi-row `VALUES` statements (`_statements`); a row whose key is there
    already is skipped. The values are bound as the JSON arrays of before stored them: a list or
    a dict as its JSON text, a float that is not finite as null. (Bound in C in one call, with
    the GIL released while SQLite runs it: JSON arrays unpacked by `json_extract` cost two
    fifths more of the writer's CPU, the JSON being parsed again for every column.)"""
    at = 0
    for count in _statements(len(rows), _most_rows(db, len(columns))):
        some = rows[at : at + count]
        at += count
        values = [v if type(v) not in _ODD else _bindable(v) for row in some for v in row]
        db.execute(_values_sql(table, columns, key, count), values)


def _most_rows(db: sqlite3.Connection, width: int) -> int:
    """The rows of a statement at most: a power of two, within the connection's bound on
    variables (999 in builds before SQLite 3.32, and a build may set less)."""
    bound = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
    return min(_MOST_ROWS, 1 << max(0, bound.bit_length() - 1))


_ODD = frozenset({float, list, dict, tuple})


def _bindable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return msgspec.json.encode(value).decode()


@functools.lru_cache(maxsize=64)
def _values_sql(table: str, columns: tuple[str, ...], key: str, count: int) -> str:
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * count)} "  # noqa: S608
        f"ON CONFLICT ({key}) DO NOTHING"
    )


class SqliteDatabase:
    dialect: Literal["sqlite", "postgres"] = "sqlite"

    def __init__(self, path: Path, *, sync: str = "full") -> None:
        if sync not in ("full", "normal"):
            raise StoreError(f"unknown SQLite sync mode {sync!r}")
        self.path = path
        self.where = str(path)
        self.journal_folder = path.with_name(path.name + ".journal")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._reader = self._connect()
            _migrate_sqlite(self._reader, path)
            self._sync = sync.upper()
            self._writer = self._connect_writer()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="llmrouter-sqlite")
        self._reporter = ThreadPoolExecutor(1, thread_name_prefix="llmrouter-sqlite-reports")
        self._report_db: sqlite3.Connection | None = None
        self._watch: _Watch | None = None
        self._poller: asyncio.Task[None] | None = None

    def _connect_writer(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            # full: a commit is on disk when it returns; normal: in the OS's hands (WAL).
            db.execute(f"PRAGMA synchronous={self._sync}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    async def fetchone(self, sql: str, *args: Any, heavy: bool = False) -> Row | None:
        rows = await self.fetchall(sql, *args, heavy=heavy)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, *args: Any, heavy: bool = False) -> list[Row]:
        if heavy:
            rows: list[Row] = await self._in_thread(
                self._reporter, lambda: self._reports().execute(sql, args).fetchall()
            )
            return rows
        try:
            return self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.where}: {exc}") from None

    def _reports(self) -> sqlite3.Connection:
        """The connection of the reporting thread (made there, on first use)."""
        if self._report_db is None:
            self._report_db = self._connect()
        return self._report_db

    async def execute(self, sql: str, *args: Any) -> int:
        def run() -> int:
            self._end_transaction()
            return self._writer.execute(sql, args).rowcount

        changed: int = await self._in_thread(self._thread, run)
        return changed

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str
    ) -> None:
        step = _ROWS_A_STEP
        steps = [rows[i : i + step] for i in range(0, len(rows), step)]
        insert = functools.partial(_insert_values, table, tuple(columns), key)

        def run() -> None:
            self._end_transaction()
            db = self._writer
            if len(steps) == 1 and len(_statements(len(steps[0]), _most_rows(db, len(columns)))) == 1:
                insert(db, steps[0])  # one statement: its own transaction
                return
            try:
                db.execute("BEGIN IMMEDIATE")
                waited = 0.0
                for i, some in enumerate(steps):
                    wall, cpu = time.perf_counter(), time.thread_time()
                    if i:
                        os.sched_yield()
                    insert(db, some)
                    wait = time.perf_counter() - wall - (time.thread_time() - cpu)
                    waited += wait
                    if i + 1 < len(steps) and (wait > _STEP_WAIT_S or waited > _WAIT_S):
                        # The loop or another process is busy: the rest in one statement.
                        insert(db, [row for rest in steps[i + 1 :] for row in rest])
                        break
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # (the next write tries again)
                    self._end_transaction()
                raise

        await self._in_thread(self._thread, run)

    def _end_transaction(self) -> None:
        """In the writer thread, after a failed batch and before each write: a transaction left
        open is rolled back, or if that fails too, the connection is opened again and the old one
        closed (which rolls it back), so that no write joins a transaction that never commits."""
        db = self._writer
        if not db.in_transaction:  # (some errors end it themselves)
            return
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("%s: cannot roll back a failed batch (%s); reconnecting", self.where, exc)
            fresh = self._connect_writer()  # (if this fails too, the next write tries again)
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._writer = fresh

    async def _in_thread(self, thread: ThreadPoolExecutor, fn: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(thread, fn)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from None
        except (sqlite3.DataError, sqlite3.ProgrammingError, sqlite3.InterfaceError) as exc:
            raise DataRejected(f"{self.where}: {exc}") from None
        except (OverflowError, ValueError, TypeError) as exc:  # a value sqlite3 cannot bind
            raise DataRejected(f"{self.where}: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"{self.where}: {exc}") from None

    async def ping(self) -> bool:
        try:
            self._reader.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    # One file has no notifications. A change llmrouter makes (a key revoked by the API, the
    # dashboard or a command) is announced by a byte appended to the channel's marker file, so a
    # listener hears of it at its first `poll` in the next turn of its event loop (one `stat`);
    # a change by SQL behind llmrouter's back bumps a version (the `key_changes` trigger) that
    # listeners read each second.
    listening = False

    def _marker(self, channel: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{channel}")

    async def listen(self, channel: str, on_message: Callable[[str | None], None]) -> None:
        if channel != _KEYS_CHANNEL:
            raise StoreError(f"SQLite has no channel {channel!r}")
        marker = self._marker(channel)
        with contextlib.suppress(OSError):
            marker.touch(exist_ok=True)
        self._watch = _Watch(marker, _size(marker), self._key_version(), on_message)
        self._poller = asyncio.get_running_loop().create_task(self._poll_versions())
        self.listening = True

    def poll(self) -> None:
        # One `stat` a turn of the event loop, not one a request: under load it was a tenth of a
        # request's cost (bench/README.md). What a turn's callbacks handle came in before the
        # turn began, so a change announced before a request arrived is still seen by it, as
        # PostgreSQL's NOTIFY is once its listener has run.
        watch = self._watch
        if watch is None or watch.fresh:
            return
        asyncio.get_running_loop().call_soon(watch.stale)  # runs after this turn's callbacks
        watch.fresh = True
        if (size := _size(watch.marker)) != watch.size:
            watch.size = size
            watch.on_message(None)

    def changed(self, channel: str) -> None:
        try:
            fd = os.open(self._marker(channel), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            log.warning("cannot announce a change on %s: %s", channel, exc)
            return
        try:
            os.write(fd, b".")  # the size only grows, so no two changes look alike
        finally:
            os.close(fd)

    def _key_version(self) -> int:
        try:
            row = self._reader.execute("SELECT version FROM key_changes").fetchone()
        except sqlite3.Error:
            return -1
        return int(row[0]) if row else -1

    async def _poll_versions(self) -> None:
        while True:
            await asyncio.sleep(_VERSION_POLL_SECONDS)
            watch = self._watch
            if watch is not None and (version := self._key_version()) != watch.version:
                watch.version = version
                watch.on_message(None)

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self._thread.shutdown(wait=True)
        self._reporter.shutdown(wait=True)
        self._reader.close()
        self._writer.close()
        if self._report_db is not None:
            self._report_db.close()


_KEYS_CHANNEL = "llmrouter_keys"
_VERSION_POLL_SECONDS = 1.0


@dataclass
class _Watch:
    marker: Path
    size: tuple[int, int, int]
    version: int
    on_message: Callable[[str | None], None]
    fresh: bool = False  # the marker was looked at in this turn of the event loop

    def stale(self) -> None:
        self.fresh = False


def _size(path: Path) -> tuple[int, int, int]:
    """What tells one state of a marker from the next: it only grows, unless it is replaced (a
    new file may reuse the old one's inode, not its modification time too)."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _migrate_sqlite(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    _check_version(version, str(path))
    for target in range(version + 1, len(MIGRATIONS) + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            (current,) = db.execute("PRAGMA user_version").fetchone()
            if current < target:  # another process may have migrated meanwhile
                for statement in MIGRATIONS[target - 1].sqlite:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _check_version(version: int, where: str) -> None:
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{where} has schema version {version}, newer than this llmrouter knows "
            f"({len(MIGRATIONS)}); upgrade llmrouter"
        )


# -- PostgreSQL -----------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")
_HEARTBEAT_SECONDS = 5.0
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _numbered(sql: str) -> str:
    counter = iter(range(1, 1 << 16))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


async def _in_steps(conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """A batch into PostgreSQL in one transaction, `_ROWS_A_STEP` rows a round trip while each
    comes back soon, and the rest at once from the first that does not (or once the steps have
    taken `_PG_STEPS_S` in all). The backend's CPU for a batch (its indexes, the rollup's
    trigger, some 0.1 ms a record) is a burst of tens of milliseconds at once for the few hundred
    records a quiet c1 load gathers in 0.1 s, on a core a request's wake-ups need; in steps it
    is given out between them, as SQLite's is (`_ROWS_A_STEP`). A busy loop resumes a step late,
    which ends the stepping: under load a batch costs one round trip more than before."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    step = _ROWS_A_STEP
    for i in range(0, len(rows), step):
        if i + step >= len(rows):
            await conn.executemany(sql, rows[i:])
            return
        began = loop.time()
        await conn.executemany(sql, rows[i : i + step])
        now = loop.time()
        if now - began > _PG_STEP_S or now - started > _PG_STEPS_S:
            await conn.executemany(sql, rows[i + step :])
            return


_PG_STEP_S = 0.002  # a step's round trip, beyond which the rest goes at once
_PG_STEPS_S = 0.025  # the steps of one batch, in all


class PostgresDatabase:
    dialect: Literal["sqlite", "postgres"] = "postgres"
    journal_folder: Path  # under the server's home: set by `open_database`

    def __init__(self, pool: Any, where: str, url: str, settings: dict[str, str]) -> None:
        self._pool = pool
        self.where = where
        self._url = url
        self._settings = settings
        self._sql: dict[str, str] = {}
        self.listening = False
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, *, schema: str | None = None) -> PostgresDatabase:
        import asyncpg

        where = _without_password(url)
        settings = {"application_name": "llmrouter"}
        if schema is not None:
            if not _SCHEMA_NAME.match(schema):
                raise StoreError(f"database_schema {schema!r} is not a plain lower-case name")
            settings["search_path"] = schema
        try:
            if schema is not None:
                conn = await asyncpg.connect(url, timeout=10)
                try:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                finally:
                    await conn.close()
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=10, timeout=10, server_settings=settings
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to the database at {where}: {exc}") from None
        db = cls(pool, where, url, settings)
        await db._migrate()
        return db

    def _q(self, sql: str) -> str:
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = _numbered(sql)
        return text

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # One migrator at a time across every replica; the others wait, then find it done.
            await conn.execute("SELECT pg_advisory_xact_lock(7246518091)")
            await conn.execute("CREATE TABLE IF NOT EXISTS llmrouter_schema (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM llmrouter_schema") or 0
            _check_version(version, self.where)
            for target in range(version + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[target - 1].postgres:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO llmrouter_schema (version) VALUES ($1)", target)

    async def fetchone(self, sql: str, *args: Any, heavy: bool = False) -> Row | None:
        record = await self._run("fetchrow", sql, args)
        return tuple(record) if record is not None else None

    async def fetchall(self, sql: str, *args: Any, heavy: bool = False) -> list[Row]:
        return [tuple(r) for r in await self._run("fetch", sql, args)]

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._run("execute", sql, args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str
    ) -> None:
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "  # noqa: S608
            f"ON CONFLICT ({key}) DO NOTHING"
        )
        sql = self._q(sql)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await _in_steps(conn, sql, rows)
        except Exception as exc:
            raise self._translate(exc) from None

    async def _run(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        try:
            async with self._pool.acquire() as conn:
                return await getattr(conn, method)(self._q(sql), *args)
        except Exception as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: Exception) -> StoreError:
        """asyncpg's errors, as the store's: a refusal of the data (SQLSTATE classes 22 and 23,
        or a value asyncpg cannot encode) apart from the database being unreachable."""
        import asyncpg

        if isinstance(exc, asyncpg.UniqueViolationError):
            return IntegrityError(str(exc))
        if isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate or "").startswith(("22", "23")):
            return DataRejected(f"{self.where}: {exc}")
        if isinstance(exc, (ValueError, TypeError, OverflowError)):  # asyncpg's encoding errors
            return DataRejected(f"{self.where}: {exc}")
        if isinstance(exc, (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)):
            return StoreError(f"{self.where}: {exc}")
        raise exc

    async def ping(self) -> bool:
        try:
            await self._run("fetchval", "SELECT 1", ())
        except StoreError:
            return False
        return True

    def poll(self) -> None:
        return None  # notifications arrive by themselves

    def changed(self, channel: str) -> None:
        return None  # the triggers NOTIFY, in the changing transaction

    async def listen(self, channel: str, on_message: Callable[[str | None], None]) -> None:
        self._listener = asyncio.get_running_loop().create_task(
            self._listen_forever(channel, on_message)
        )

    async def _listen_forever(self, channel: str, on_message: Callable[[str | None], None]) -> None:
        """One connection of its own, LISTENing; made again (after a pause) when it is lost."""
        import asyncpg

        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self._url, timeout=10, server_settings=self._settings)
                await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_message(payload))
                on_message(None)  # anything learnt before this connection may be stale
                self.listening = True
                # A connection a network device dropped without a word would look alive for
                # ever: ask on it, and take a late answer as the connection lost.
                while True:
                    await asyncio.sleep(_HEARTBEAT_SECONDS)
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), _HEARTBEAT_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the database's notifications on %s stopped: %r", channel, exc)
            finally:
                self.listening = False
                on_message(None)
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(2.0)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()


def _without_password(url: str) -> str:
    """The database URL for messages: scheme, user, hosts and database; no password, no query
    (which may hold one). Not parsed as one host: asyncpg takes `h1:5432,h2:5432`."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] + "@" if at else ""
    return f"{scheme}://{user}{hosts}{slash}{path.split('?', 1)[0]}"
