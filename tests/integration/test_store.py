"""Keys, migrations and the ledger: one suite, run on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest

from llmrouter.accounts.keys import KEY_PATTERN, KeyError_, Keys
from llmrouter.accounts.ledger import Ledger, Record
from llmrouter.accounts.store import MIGRATIONS, Database, StoreError, open_database
from llmrouter.errors import AuthenticationFailed
from llmrouter.settings import Policy
from tests.conftest import PG_URL

Opener = Callable[[], Awaitable[Database]]

HOSTILE = [
    "x'); DROP TABLE api_keys; --",
    'quote " and \\ backslash',
    "tab\tnewline\nreturn\rbell\x07escape\x1b[31m",
    "ünïcödé ☃ 𝄞 \u202e",
    "$1 ? %s {0}",
    "k" * 60000,
]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":

        async def sqlite() -> Database:
            return await open_database(None, tmp_path)

        yield sqlite
        return
    schema = request.getfixturevalue("pg_schema")

    async def postgres() -> Database:
        return await open_database(PG_URL, tmp_path, schema=schema)

    yield postgres


def run(opener: Opener, work: Callable[[Database], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        db = await opener()
        try:
            return await work(db)
        finally:
            await db.aclose()

    return asyncio.run(main())


def test_keys_round_trip_rotate_revoke(opener: Opener) -> None:
    async def work(db: Database) -> None:
        keys = Keys(db)
        policy = Policy(rpm=5, credit_limit=1.5, reset="weekly", models=frozenset({"a"}))
        key, secret = await keys.create("app", owner="team", policy=policy)
        assert KEY_PATTERN.match(secret)
        principal = await keys.authenticate(secret)
        assert principal.id == f"key:{key.id}" and principal.limits == policy
        assert principal.owner == "team" and not principal.admin
        tampered = secret[:-7] + ("A" if secret[-7] != "A" else "B") + secret[-6:]
        with pytest.raises(AuthenticationFailed):
            await keys.authenticate(tampered)  # the checksum no longer matches
        with pytest.raises(KeyError_, match="exists"):
            await keys.create("app")
        rotated, new_secret = await keys.rotate("app")
        assert rotated.id == key.id and new_secret != secret
        with pytest.raises(AuthenticationFailed):
            await keys.authenticate(secret)
        assert (await keys.authenticate(new_secret)).id == principal.id
        await keys.revoke(key.id)
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await keys.authenticate(new_secret)
        with pytest.raises(KeyError_):
            await keys.rotate(key.id)
        assert (await keys.get(key.id, live=False)).status == "revoked"
        await keys.create("app")  # the name is free again once revoked
        assert [k.name for k in await keys.list(include_revoked=True)] == ["app", "app"]

    run(opener, work)


def test_a_made_up_key_is_refused_without_a_read_and_a_cached_one_without_its_checksum(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksum refuses a typo or a made-up key before the store is read; a key whose hash
    is in the cache was issued, so its checksum is not worked out again."""
    from llmrouter.accounts import keys as keys_module

    async def work(db: Database) -> tuple[int, int]:
        keys = Keys(db, cache_seconds=60)
        await keys.start()  # (listening for changes: the cache is on)
        for _ in range(500):  # (PostgreSQL's listener connects in the background)
            if db.listening:
                break
            await asyncio.sleep(0.01)
        _, secret = await keys.create("app")
        reads = 0
        fetchone = db.fetchone

        async def counted(*args: Any) -> Any:
            nonlocal reads
            reads += 1
            return await fetchone(*args)

        monkeypatch.setattr(db, "fetchone", counted)
        for tampered in (
            secret[:-1] + ("A" if secret[-1] != "A" else "B"),
            secret[:-9] + "x" + secret[-8:],
        ):
            with pytest.raises(AuthenticationFailed):
                await keys.authenticate(tampered)
        refused_reads = reads
        await keys.authenticate(secret)  # read once, then cached
        checksums = 0
        checksum = keys_module._checksum

        def counted_checksum(text: str) -> str:
            nonlocal checksums
            checksums += 1
            return checksum(text)

        monkeypatch.setattr(keys_module, "_checksum", counted_checksum)
        for _ in range(3):
            await keys.authenticate(secret)
        assert db.listening
        return refused_reads, checksums

    assert run(opener, work) == (0, 0)


def test_expired_keys_are_refused(opener: Opener) -> None:
    async def work(db: Database) -> None:
        keys = Keys(db)
        with pytest.raises(KeyError_, match="future"):
            await keys.create("old", expires_at=int(time.time()) - 1)
        key, secret = await keys.create("soon", expires_at=int(time.time()) + 3600)
        assert (await keys.authenticate(secret)).expires_at == key.expires_at
        await db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", int(time.time()) - 1, key.id)
        with pytest.raises(AuthenticationFailed, match="expired"):
            await keys.authenticate(secret)
        assert (await keys.get(key.id)).status == "expired"

    run(opener, work)


def test_hostile_names_are_stored_intact(opener: Opener) -> None:
    async def work(db: Database) -> None:
        keys = Keys(db)
        for i, name in enumerate(HOSTILE):
            key, secret = await keys.create(name, owner=name[::-1] + str(i))
            assert (await keys.authenticate(secret)).name == name
            assert (await keys.get(name)).id == key.id
        assert sorted(k.name for k in await keys.list()) == sorted(HOSTILE)
        with pytest.raises(KeyError_, match="NUL"):
            await keys.create("nul\x00name")
        with pytest.raises(KeyError_, match="empty"):
            await keys.create(" \t")
        assert await keys.count() == len(HOSTILE)  # the tables are all still there

    run(opener, work)


def test_migrations_run_once_and_a_newer_schema_is_refused(opener: Opener, tmp_path: Path) -> None:
    run(opener, lambda db: Keys(db).create("kept"))
    assert [k.name for k in run(opener, lambda db: Keys(db).list())] == ["kept"]

    async def bump(db: Database) -> None:
        if db.dialect == "sqlite":
            await db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        else:
            await db.execute("INSERT INTO llmrouter_schema (version) VALUES (?)", len(MIGRATIONS) + 1)

    run(opener, bump)
    with pytest.raises(StoreError, match="newer"):
        run(opener, lambda db: db.ping())


def record(request_id: str, **fields: Any) -> Record:
    now = time.time()
    defaults: dict[str, Any] = {
        "principal": "key:abc",
        "model_requested": "m",
        "model": "m",
        "provider": "p",
        "attempts": ["p/m ok 3ms"],
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "cost": 0.25,
        "latency_ms": 12.5,
        "status": 200,
        "finish_reason": "stop",
        "created_at": now,
        "finished_at": now,
    }
    return Record(request_id=request_id, **{**defaults, **fields})


class CountingDatabase:
    """The real database, counting the ledger's transactions."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str
    ) -> None:
        self.batches.append(len(rows))
        await self.db.insert_rows(table, columns, rows, key=key)


def test_ledger_group_commit_is_durable_and_idempotent(opener: Opener) -> None:
    async def work(db: Database) -> None:
        counting = CountingDatabase(db)
        ledger = Ledger(counting, batch_max=64)  # type: ignore[arg-type]
        ledger.start()
        ids = [f"cmpl-{uuid.uuid4().hex}" for _ in range(300)]
        await asyncio.gather(*(ledger.commit(record(i)) for i in ids))
        assert sum(counting.batches) == 300
        assert len(counting.batches) < 300 and max(counting.batches) <= 64  # grouped
        await ledger.commit(record(ids[0], cost=99.0))  # the same request again: ignored
        await ledger.aclose()
        (rows,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
        assert rows == 300
        got = await Ledger(db).get(ids[0])
        assert got is not None and got.cost == 0.25 and got.attempts == ["p/m ok 3ms"]

    run(opener, work)


def test_ledger_keeps_hostile_user_and_metadata(opener: Opener) -> None:
    user = "nul\x00 ' \" ; DROP TABLE ledger; -- \n\x1b ☃"
    metadata = {"k'\x00": 'v"\x01', "sql": "'); DELETE FROM ledger; --", "long": "x" * 512}

    async def work(db: Database) -> None:
        ledger = Ledger(db)
        ledger.start()
        await ledger.commit(record("cmpl-hostile", user=user, metadata=metadata))
        await ledger.aclose()
        got = await ledger.get("cmpl-hostile")
        assert got is not None and got.user == user and got.metadata == metadata
        assert await ledger.get("cmpl-missing") is None

    run(opener, work)


def test_ledger_spend_and_totals(opener: Opener) -> None:
    day = 86400.0
    base = 1_800_000_000.0  # 2027-01-15 08:00 UTC

    async def work(db: Database) -> None:
        ledger = Ledger(db)
        ledger.start()
        await ledger.commit(record("a", created_at=base, cost=1.0, principal="key:x"))
        await ledger.commit(record("b", created_at=base + day, cost=2.0, principal="key:x", model="n"))
        await ledger.commit(
            record("c", created_at=base + day, cost=4.0, principal="key:y", status=502, provider="q")
        )
        await ledger.aclose()
        assert await ledger.spent("key:x", 0) == 3.0
        assert await ledger.spent("key:x", base + 1) == 2.0
        by_key = {t.group: t for t in await ledger.totals(by="key")}
        assert by_key["key:x"].requests == 2 and by_key["key:x"].cost == 3.0
        assert by_key["key:y"].failed == 1
        by_day = await ledger.totals(by="day")
        assert [(t.group, t.requests) for t in by_day] == [("2027-01-15", 1), ("2027-01-16", 2)]
        by_model = {t.group: t.prompt_tokens for t in await ledger.totals(by="model")}
        assert by_model == {"m": 6, "n": 3}
        window = await ledger.totals(since=base + 1, until=base + 2 * day, by="provider")
        assert {t.group: t.requests for t in window} == {"p": 1, "q": 1}

    run(opener, work)


def test_absurd_token_counts_are_kept_clamped(opener: Opener) -> None:
    async def work(db: Database) -> None:
        ledger = Ledger(db)
        ledger.start()
        await ledger.commit(record("huge", prompt_tokens=2**70))
        await ledger.aclose()
        got = await ledger.get("huge")
        assert got is not None and got.prompt_tokens == 2**63 - 1

    run(opener, work)


def test_a_record_the_store_refuses_does_not_stop_the_others(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    async def work(db: Database) -> None:
        ledger = Ledger(db)
        ledger.start()
        good = [record(f"ok-{i}") for i in range(3)]
        bad = record("too-big", error="lone \ud800 surrogate")  # no UTF-8 can hold it
        await asyncio.wait_for(
            asyncio.gather(*(ledger.commit(r) for r in (good[0], bad, good[1], good[2]))), 10
        )
        await ledger.aclose()
        for r in good:
            assert await ledger.get(r.request_id) is not None
        assert await ledger.get("too-big") is None
        (refused,) = [r for r in caplog.records if "refused a ledger record" in r.getMessage()]
        assert refused.fields["record"]["request_id"] == "too-big"  # type: ignore[attr-defined]

    run(opener, work)


class Statements:
    """The SQLite writer's connection, keeping the text of each statement run through it."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.run: list[str] = []

    def execute(self, sql: str, *args: Any) -> Any:
        self.run.append(sql)
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def inserts(self) -> int:
        return sum(sql.startswith("INSERT INTO ledger") for sql in self.run)


class NoRollback(Statements):
    """The writer's connection, whose ROLLBACK fails."""

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


def sqlite_run(tmp_path: Path, work: Callable[[Database], Awaitable[Any]]) -> Any:
    """`run` on the SQLite store under `tmp_path`."""

    async def sqlite() -> Database:
        return await open_database(None, tmp_path)

    return run(sqlite, work)


def test_sqlite_writes_a_batch_in_steps_that_give_up_the_core_in_one_transaction(
    tmp_path: Path,
) -> None:
    """While the event loop is idle, a batch's CPU is spent a few rows at a time, the writer
    thread yielding its core between steps (a whole commit at once put milliseconds into a c1
    p99), and the batch is still one transaction: a row refused in its last step keeps every row
    of it out, and leaves no transaction open for the next write to join."""
    from llmrouter.accounts import store
    from llmrouter.accounts.ledger import COLUMNS

    yields: list[int] = []
    real_yield = os.sched_yield

    def counted() -> None:
        yields.append(1)
        real_yield()

    async def work(db: Database) -> None:
        step = store._ROWS_A_STEP
        statements = db._writer = Statements(db._writer)  # type: ignore[attr-defined]
        inserts = statements.inserts

        rows = [record(f"step-{i}").row() for i in range(2 * step + 3)]  # three steps
        # (A step never waits for the GIL here; a loaded machine must not make it look so.)
        with patch.object(store.os, "sched_yield", counted), patch.object(store, "_WAIT_S", 60):
            await db.insert_rows("ledger", COLUMNS, rows, key="request_id")
            assert (inserts(), len(yields)) == (3, 2)
            (n,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
            assert n == len(rows)
            (total,) = await db.fetchone("SELECT sum(requests) FROM usage_hourly") or (0,)
            assert total == len(rows)  # the rollup counted each once

            yields.clear()
            principal = COLUMNS.index("principal")
            more = [list(record(f"more-{i}").row()) for i in range(2 * step + 3)]
            more[-1][principal] = None  # NOT NULL: refused, in the third step
            with pytest.raises(StoreError):
                await db.insert_rows("ledger", COLUMNS, more, key="request_id")
            assert len(yields) == 2  # the first two steps ran
            assert not db._writer.in_transaction  # type: ignore[attr-defined]
            (n,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
            assert n == len(rows)  # and were rolled back with it
            (total,) = await db.fetchone("SELECT sum(requests) FROM usage_hourly") or (0,)
            assert total == len(rows)

            # The write lock is free: another connection writes at once.
            other = sqlite3.connect(db.path, timeout=0)  # type: ignore[attr-defined]
            other.execute("UPDATE key_changes SET version = version")
            other.commit()
            other.close()
            yields.clear()
            statements.run.clear()
            await db.insert_rows("ledger", COLUMNS, rows[:1], key="request_id")
            assert (inserts(), len(yields)) == (1, 0)  # one step: no transaction of its own

    sqlite_run(tmp_path, work)


@pytest.mark.parametrize(
    ("walls", "cpus", "steps"),
    [
        # The first step took 3 ms, all of it its own CPU; the second waited 1.5 ms.
        ([0.0, 0.003, 1.0, 1.0015], [0.0, 0.003, 0.003, 0.003], 2),
        # Each step waited 0.8 ms: in all more than 5 ms after the seventh.
        ([x for i in range(7) for x in (float(i), i + 0.0008)], [0.0] * 14, 7),
    ],
    ids=["one-step-waited", "the-steps-waited-in-all"],
)
def test_sqlite_writes_the_rest_of_a_batch_at_once_once_its_steps_have_waited(
    tmp_path: Path, walls: list[float], cpus: list[float], steps: int
) -> None:
    """The write lock is held from the first step to the commit, and each step takes the GIL back
    (a busy event loop holds it for up to the switch interval) after a yield that may give the
    core to a busy process: stepping on under load cost CPU and held the lock ten times as long.
    Once a step's wall time exceeds its own CPU by more than `_STEP_WAIT_S`, or the steps' by more
    than `_WAIT_S` in all, the rest of the batch goes in one statement, every row of it once."""
    import itertools
    import types

    from llmrouter.accounts import store
    from llmrouter.accounts.ledger import COLUMNS

    # (Each step reads both clocks before and after; then they stand still: no more waiting.)
    wall = itertools.chain(walls, itertools.repeat(99.0))
    cpu = itertools.chain(cpus, itertools.repeat(0.5))
    clock = types.SimpleNamespace(perf_counter=lambda: next(wall), thread_time=lambda: next(cpu))
    yields: list[int] = []

    async def work(db: Database) -> None:
        statements = db._writer = Statements(db._writer)  # type: ignore[attr-defined]
        rows = [record(f"busy-{i}").row() for i in range(10 * store._ROWS_A_STEP)]
        with (
            patch.object(store, "time", clock),
            patch.object(store.os, "sched_yield", lambda: yields.append(1)),
        ):
            await db.insert_rows("ledger", COLUMNS, rows, key="request_id")
        # `steps` steps, then the rest at once (in as few statements of a few sizes as it takes)
        rest = store._statements(len(rows) - steps * store._ROWS_A_STEP, store._MOST_ROWS)
        assert (statements.inserts(), len(yields)) == (steps + len(rest), steps - 1)
        (n,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
        assert n == len(rows)
        (total,) = await db.fetchone("SELECT sum(requests) FROM usage_hourly") or (0,)
        assert total == len(rows)

    sqlite_run(tmp_path, work)


@pytest.mark.parametrize(
    ("durations", "steps"),
    [
        ([0.0005] * 9, [8, 8, 8, 8, 8]),  # quick round trips: all in steps
        ([0.0005, 0.003], [8, 8, 24]),  # a step back late (a busy loop): the rest at once
        ([0.0019] * 99, [8] * 14 + [200 - 8 * 14]),  # quick each, but 25 ms in all: the rest at once
    ],
    ids=["quick", "late", "long"],
)
def test_postgres_batches_go_in_steps_while_each_comes_back_soon(
    durations: list[float], steps: list[int]
) -> None:
    from llmrouter.accounts import store

    sent: list[int] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        clock = [0.0]
        loop.time = lambda: clock[0]  # type: ignore[method-assign]
        took = iter(durations)

        class Conn:
            async def executemany(self, sql: str, rows: Sequence[Any]) -> None:
                sent.append(len(rows))
                clock[0] += next(took, 0.0005)

        await store._in_steps(Conn(), "INSERT", [(i,) for i in range(sum(steps))])

    asyncio.run(run())
    assert sent == steps


def test_sqlite_rows_past_the_bound_on_variables_go_in_several_statements_each_once(
    tmp_path: Path,
) -> None:
    """A statement of more rows than the connection's bound on variables would be refused (999
    in SQLite builds before 3.32, and a build may set less): the rows are split by the bound the
    connection reports, every one inserted once (a duplicate skipped) and summed once, all in
    one transaction."""
    from llmrouter.accounts.ledger import COLUMNS

    async def work(db: Database) -> None:
        statements = db._writer = Statements(db._writer)  # type: ignore[attr-defined]
        statements.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 3 * len(COLUMNS))  # 3 rows
        rows = [record(f"wide-{i}").row() for i in range(7)]
        await db.insert_rows("ledger", COLUMNS, rows, key="request_id")
        assert statements.inserts() == 4  # 2 + 2 + 2 + 1 (powers of two within the bound)
        assert statements.run[0] == "BEGIN IMMEDIATE" and statements.run[-1] == "COMMIT"
        await db.insert_rows("ledger", COLUMNS, rows[:2], key="request_id")  # (there already)
        (n,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
        (total,) = await db.fetchone("SELECT sum(requests) FROM usage_hourly") or (0,)
        assert (n, total) == (7, 7)
        stored = await db.fetchone("SELECT stream, status, cost FROM ledger WHERE request_id = 'wide-0'")
        assert stored is not None and tuple(stored) == (0, 200, 0.25)

    sqlite_run(tmp_path, work)


def test_sqlite_batches_of_every_size_use_a_few_statement_texts(tmp_path: Path) -> None:
    """Each distinct statement text is prepared and kept in sqlite3's cache (one of hundreds of
    rows is megabytes): whatever the batch sizes, a few texts only, powers of two."""
    from llmrouter.accounts.ledger import COLUMNS

    async def work(db: Database) -> None:
        from llmrouter.accounts import store

        statements = db._writer = Statements(db._writer)  # type: ignore[attr-defined]
        n = 0
        with patch.object(store, "_STEP_WAIT_S", -1.0):  # (as if busy: the rest at once, each size)
            for size in range(1, 130):
                rows = [record(f"size-{size}-{i}").row() for i in range(size)]
                await db.insert_rows("ledger", COLUMNS, rows, key="request_id")
                n += size
        texts = {sql for sql in statements.run if sql.startswith("INSERT INTO ledger")}
        assert len(texts) <= 11  # 1 to 8 rows (a step), and 16, 32, 64 for the rest of a batch
        (count,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
        assert count == n

    sqlite_run(tmp_path, work)


def test_sqlite_binds_values_as_the_json_arrays_of_before_stored_them(tmp_path: Path) -> None:
    """A replayed journal row may hold what `Record.row()` never makes: a list or a dict is
    stored as its JSON text, a float that is not finite as null (so a NOT NULL column refuses
    it), and an integer past 64 bits is a refused row, not a failure of the store."""
    from llmrouter.accounts.ledger import COLUMNS
    from llmrouter.accounts.store import DataRejected

    def row(request_id: str, **fields: Any) -> list[Any]:
        values = dict(zip(COLUMNS, record(request_id).row(), strict=True))
        return [fields.get(c, values[c]) for c in COLUMNS]

    async def work(db: Database) -> None:
        nested = row("nested", attempts=["p/m ok 1ms"], metadata={"a": "b"}, ttft_ms=float("inf"))
        await db.insert_rows("ledger", COLUMNS, [nested], key="request_id")
        stored = await db.fetchone(
            "SELECT attempts, metadata, ttft_ms FROM ledger WHERE request_id = 'nested'"
        )
        assert stored is not None and tuple(stored) == ('["p/m ok 1ms"]', '{"a":"b"}', None)
        for bad in (row("inf", cost=float("inf")), row("huge", prompt_tokens=1 << 70)):
            with pytest.raises(DataRejected):
                await db.insert_rows("ledger", COLUMNS, [bad], key="request_id")
        (n,) = await db.fetchone("SELECT count(*) FROM ledger") or (0,)
        assert n == 1

    sqlite_run(tmp_path, work)


def test_sqlite_writes_end_a_transaction_left_open_before_they_run(tmp_path: Path) -> None:
    """A write never joins a transaction that something before it left open on the writer's
    connection (it would never commit, and would keep the write lock): an update and a one-row
    insert each commit, seen at once by another connection."""
    from llmrouter.accounts.ledger import COLUMNS

    async def work(db: Database) -> None:
        writer = db._writer  # type: ignore[attr-defined]
        other = sqlite3.connect(db.path, timeout=0)  # type: ignore[attr-defined]
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE key_changes SET version = 41")
            assert await db.execute("UPDATE key_changes SET version = version + 1") == 1
            assert other.execute("SELECT version FROM key_changes").fetchone() == (1,)
            writer.execute("BEGIN IMMEDIATE")
            await db.insert_rows("ledger", COLUMNS, [record("open-1").row()], key="request_id")
            assert other.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
            assert not writer.in_transaction
        finally:
            other.close()

    sqlite_run(tmp_path, work)


def test_a_failed_rollback_leaves_no_transaction_for_later_writes(tmp_path: Path) -> None:
    """If rolling a failed batch back fails as well, the writer's connection is made again (its
    close rolls back): the batch's own error is the one raised, and later writes commit."""
    from llmrouter.accounts import store
    from llmrouter.accounts.ledger import COLUMNS

    async def work(db: Database) -> None:
        step = store._ROWS_A_STEP
        principal = COLUMNS.index("principal")
        bad = [list(record(f"bad-{i}").row()) for i in range(2 * step)]
        bad[-1][principal] = None  # refused in the second step

        real = db._writer  # type: ignore[attr-defined]
        db._writer = NoRollback(real)  # type: ignore[attr-defined]
        with pytest.raises(store.DataRejected):  # the row's refusal, not the rollback's failure
            await db.insert_rows("ledger", COLUMNS, bad, key="request_id")
        assert db._writer is not real and not db._writer.in_transaction  # type: ignore[attr-defined]
        assert db._writer.execute("PRAGMA synchronous").fetchone() == (2,)  # type: ignore[attr-defined]  # FULL, as opened
        good = [record(f"good-{i}").row() for i in range(2 * step)]
        await db.insert_rows("ledger", COLUMNS, good, key="request_id")
        assert await db.execute("UPDATE key_changes SET version = version") == 1
        check = sqlite3.connect(db.path)  # type: ignore[attr-defined]
        try:
            assert check.execute("SELECT count(*) FROM ledger").fetchone() == (len(good),)
        finally:
            check.close()

    sqlite_run(tmp_path, work)


def test_a_failed_reconnect_keeps_the_batch_error_and_the_next_write_recovers(
    tmp_path: Path,
) -> None:
    """Rolling back fails and so does opening the connection again: the batch's own error is
    still the one raised (a refused row is set aside, not retried forever), and the next write
    ends the transaction (the reconnect works then) and commits."""
    from llmrouter.accounts import store
    from llmrouter.accounts.ledger import COLUMNS

    async def work(db: Database) -> None:
        step = store._ROWS_A_STEP
        principal = COLUMNS.index("principal")
        bad = [list(record(f"bad-{i}").row()) for i in range(2 * step)]
        bad[-1][principal] = None
        db._writer = NoRollback(db._writer)  # type: ignore[attr-defined]
        real_connect = db._connect  # type: ignore[attr-defined]
        failures = [sqlite3.OperationalError("unable to open database file")]

        def connect() -> sqlite3.Connection:
            if failures:
                raise failures.pop()
            return real_connect()

        with patch.object(db, "_connect", connect):
            with pytest.raises(store.DataRejected):
                await db.insert_rows("ledger", COLUMNS, bad, key="request_id")
            assert db._writer.in_transaction  # type: ignore[attr-defined]  # (left to the next write)
            assert await db.execute("UPDATE key_changes SET version = 7") == 1
        assert not db._writer.in_transaction  # type: ignore[attr-defined]
        check = sqlite3.connect(db.path)  # type: ignore[attr-defined]
        try:
            assert check.execute("SELECT version FROM key_changes").fetchone() == (7,)
            assert check.execute("SELECT count(*) FROM ledger").fetchone() == (0,)
        finally:
            check.close()

    sqlite_run(tmp_path, work)


class CountingReads:
    """The real database, counting the single-row reads (key lookups)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    async def fetchone(self, sql: str, *args: Any, heavy: bool = False) -> Any:
        self.count += 1
        return await self.db.fetchone(sql, *args, heavy=heavy)


async def until(done: Callable[[], bool], keys: Keys, secret: str) -> None:
    """Authenticate until `done()`, for at most 2 s."""
    deadline = time.monotonic() + 2
    while not done():
        assert time.monotonic() < deadline, "no notification in 2 s"
        await keys.authenticate(secret)
        await asyncio.sleep(0.005)


def test_postgres_keys_are_cached_until_a_replica_changes_them(pg_schema: str, tmp_path: Path) -> None:
    async def main() -> None:
        one = await open_database(PG_URL, tmp_path, schema=pg_schema)
        two = await open_database(PG_URL, tmp_path, schema=pg_schema)  # another replica
        reads = CountingReads(one)
        try:
            a, b = Keys(reads, cache_seconds=60), Keys(two, cache_seconds=60)  # type: ignore[arg-type]
            await a.start()
            await b.start()
            deadline = time.monotonic() + 5
            while not (one.listening and two.listening) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            key, secret = await b.create("cached")
            for _ in range(3):
                assert (await a.authenticate(secret)).key_id == key.id
            assert reads.count == 1  # then from the cache
            # An edit by SQL, behind llmrouter's back, reaches the cache too (the trigger)...
            await two.execute("UPDATE api_keys SET name = 'renamed' WHERE id = ?", key.id)
            await until(lambda: reads.count == 2, a, secret)
            assert (await a.authenticate(secret)).name == "renamed"
            # ...and so does a revocation on another replica.
            started = time.monotonic()
            await b.revoke(key.id)
            refused: AuthenticationFailed | None = None
            while refused is None and time.monotonic() - started < 2:
                try:
                    await a.authenticate(secret)
                except AuthenticationFailed as exc:
                    refused = exc
                await asyncio.sleep(0.005)
            assert refused is not None, "the revocation did not reach the other replica in 2 s"
            assert "revoked" in refused.message and time.monotonic() - started < 1.0
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(main())


def test_sqlite_keys_are_cached_until_any_process_changes_them(tmp_path: Path) -> None:
    async def main() -> None:
        one = await open_database(None, tmp_path)
        two = await open_database(None, tmp_path)  # another worker, or the CLI
        reads = CountingReads(one)
        try:
            a, b = Keys(reads, cache_seconds=60), Keys(two, cache_seconds=60)  # type: ignore[arg-type]
            await a.start()
            key, secret = await b.create("cached")
            for _ in range(3):
                assert (await a.authenticate(secret)).key_id == key.id
            assert reads.count == 1  # then from the cache
            # A change made through llmrouter elsewhere is in force at the next request here...
            await b.update(key.id, policy=Policy(rpm=7))
            assert (await a.authenticate(secret)).limits.rpm == 7 and reads.count == 2
            await b.revoke(key.id)
            with pytest.raises(AuthenticationFailed, match="revoked"):
                await a.authenticate(secret)
            # ...and one by SQL behind llmrouter's back within a second (the version trigger).
            other, other_secret = await b.create("edited by hand")
            await a.authenticate(other_secret)
            seen = reads.count
            await two.execute("UPDATE api_keys SET name = 'renamed' WHERE id = ?", other.id)
            assert (await a.authenticate(other_secret)).name == "edited by hand"  # cached still
            await until(lambda: reads.count > seen, a, other_secret)
            assert (await a.authenticate(other_secret)).name == "renamed"
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def two_processes(
    tmp_path: Path, name: str
) -> AsyncIterator[tuple[Keys, Keys, str, str, Database]]:
    """One SQLite file's keys as two processes see them: `a` listening, `b` making the changes;
    a key `name` made by `b` and seen once by `a`; and `b`'s database."""
    one = await open_database(None, tmp_path)
    two = await open_database(None, tmp_path)
    try:
        a, b = Keys(one, cache_seconds=60), Keys(two, cache_seconds=60)
        await a.start()
        key, secret = await b.create(name)
        await a.authenticate(secret)
        yield a, b, key.id, secret, two
    finally:
        await one.aclose()
        await two.aclose()


def test_sqlite_looks_at_its_marker_once_a_loop_turn(tmp_path: Path) -> None:
    """The marker is read at the first request of a turn of the event loop and not again in that
    turn (a `stat` a request cost a tenth of a request under load). A change announced during a
    turn is seen from the next one on: what a turn handles came in before the turn began, so a
    request that arrives after a revocation is refused."""

    async def main() -> None:
        async with two_processes(tmp_path, "turns") as (a, _, key_id, secret, two):
            await asyncio.sleep(0)  # a new turn
            with patch("llmrouter.accounts.store.os.stat", wraps=os.stat) as stat:
                for _ in range(5):
                    await a.authenticate(secret)  # (a cached key: no await suspends)
                assert stat.call_count == 1
                # Another process revokes the key and announces it, during this turn...
                with sqlite3.connect(tmp_path / "llmrouter.sqlite3") as db:
                    db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
                two.changed("llmrouter_keys")
                # (this turn's requests came in before it)
                assert (await a.authenticate(secret)).key_id == key_id
                assert stat.call_count == 1
                await asyncio.sleep(0)  # ...and from the next turn on its key is refused
                with pytest.raises(AuthenticationFailed, match="revoked"):
                    await a.authenticate(secret)
                assert stat.call_count == 2

    asyncio.run(main())


class SlowListeningDatabase(CountingReads):
    """A database whose key lookups take a while, and which says it hears notifications."""

    listening = True
    delay = 0.0

    async def fetchone(self, sql: str, *args: Any, heavy: bool = False) -> Any:
        row = await super().fetchone(sql, *args, heavy=heavy)
        await asyncio.sleep(self.delay)
        return row


def test_a_lookup_overtaken_by_a_change_is_not_cached(tmp_path: Path) -> None:
    async def main() -> None:
        db = await open_database(None, tmp_path)
        slow = SlowListeningDatabase(db)
        try:
            keys = Keys(slow, cache_seconds=60)  # type: ignore[arg-type]
            key, secret = await keys.create("raced")
            slow.delay = 0.2
            lookup = asyncio.ensure_future(keys.authenticate(secret))
            await asyncio.sleep(0.05)  # the row is read; its answer is on its way
            keys._forget(key.id)  # a notification: the key changed meanwhile
            await lookup
            slow.delay = 0.0
            await keys.authenticate(secret)
            assert slow.count == 2  # read again: the overtaken read was not kept
            await keys.authenticate(secret)
            assert slow.count == 2  # this one was
        finally:
            await db.aclose()

    asyncio.run(main())


def test_the_ledger_says_when_its_backlog_is_full(tmp_path: Path) -> None:
    async def main() -> None:
        db = await open_database(None, tmp_path)
        try:
            ledger = Ledger(db, max_pending=2)  # not started: nothing is written
            ledger.submit(record("one"))
            assert not ledger.backlogged
            ledger.submit(record("two"))
            assert ledger.backlogged
            ledger.start()
            await ledger.aclose()
            assert not ledger.backlogged and await ledger.get("two") is not None
        finally:
            await db.aclose()

    asyncio.run(main())


def test_a_replaced_marker_file_of_the_same_size_is_still_a_change(tmp_path: Path) -> None:
    """Someone deletes the marker and it is made again, as long as before: the revocation that
    follows is seen at once all the same (found by a review)."""

    async def main() -> None:
        async with two_processes(tmp_path, "cached") as (a, b, key_id, secret, _):
            marker = tmp_path / "llmrouter.sqlite3.llmrouter_keys"
            size = marker.stat().st_size
            marker.unlink()
            await b.revoke(key_id)  # appends to a new, empty marker: one byte
            marker.write_bytes(b"." * size)  # ...and someone makes it as long as it was
            with pytest.raises(AuthenticationFailed, match="revoked"):
                await a.authenticate(secret)

    asyncio.run(main())
