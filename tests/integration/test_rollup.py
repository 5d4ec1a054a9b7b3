"""The dashboard's reads against the store, on SQLite and on the real PostgreSQL: the hourly rollup
is exactly the ledger's sums (written through the Ledger, duplicates resubmitted, and records made
before the rollup existed), and the request log pages through every record once, newest first,
with its filters, each read bounded by a LIMIT; a chart's grouping comes back as its top groups
and one for the rest, and the pages look up only the keys they name."""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmrouter.accounts.keys import ApiKey, Keys
from llmrouter.accounts.ledger import Ledger, Record
from llmrouter.accounts.store import MIGRATIONS, ROLLUP_BOUNDS_MS, Database, open_database
from llmrouter.admin import queries
from llmrouter.admin.pages import Dashboard, _Visit
from llmrouter.admin.sessions import Session
from llmrouter.api.http import Request
from llmrouter.settings import embedded_default
from tests.conftest import PG_URL

Opener = Callable[[], Awaitable[Database]]
HOUR = 3600
BASE = 1_800_000_000 // HOUR * HOUR  # a whole hour


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


def records(n: int, seed: int = 7) -> list[Record]:
    """Records of several hours, keys, models and providers; failures with and without an
    answering deployment, streams with a first token, fallbacks; latencies on and around the
    buckets' bounds."""
    rng = random.Random(seed)
    latencies = [*ROLLUP_BOUNDS_MS, 0.0, 0.4, 24.9, 25.1, 99_999.0, 1e6]
    out = []
    for i in range(n):
        created = BASE + rng.randrange(30) * HOUR + rng.random() * HOUR
        if i % 17 == 0:
            created = BASE + 5 * HOUR  # exactly on an hour's start
        failed = rng.random() < 0.25
        answered = not failed or rng.random() < 0.5
        stream = rng.random() < 0.4
        latency = rng.choice(latencies) if rng.random() < 0.3 else rng.uniform(0, 70_000)
        out.append(
            Record(
                request_id=f"req-{i:05d}",
                principal=rng.choice(["key:a", "key:b", "key:c", "jwt:idp sub", ""]),
                model_requested=rng.choice(["m1", "m2", "alias"]),
                model=rng.choice(["m1", "m2"]) if answered else None,
                provider=rng.choice(["p1", "p2"]) if answered else None,
                attempts=["p1/x fail 3ms", "p2/x ok 4ms"][: rng.choice([0, 1, 1, 2])],
                prompt_tokens=rng.randrange(5000),
                completion_tokens=rng.randrange(5000),
                cost=rng.random() * rng.choice([1e-6, 1e-3, 1.0, 10.0]),
                latency_ms=latency,
                ttft_ms=rng.choice([*latencies, rng.uniform(0, 5000)]) if stream else None,
                status=rng.choice([400, 429, 499, 502, 503]) if failed else 200,
                error=rng.choice(["upstream_error", "timeout", None if rng.random() < 0.2 else "x"])
                if failed
                else (None if rng.random() < 0.95 else "stream_error"),
                stream=stream,
                created_at=created,
                finished_at=created + latency / 1000,
            )
        )
    return out


def expected(written: Sequence[Record]) -> dict[tuple[Any, ...], list[Any]]:
    """The rollup, computed here from the records themselves (not by SQL)."""
    sums: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0] * 9 + [0] * 24)
    for r in written:
        key = (
            int(r.created_at // HOUR) * HOUR,
            r.principal,
            r.model or r.model_requested,
            r.provider or "",
            r.error or "",
        )
        row = sums[key]
        values = [
            1,
            int(r.status >= 400 or r.error is not None),
            int(len(r.attempts) > 1),
            r.prompt_tokens,
            r.completion_tokens,
            r.cost,
            r.latency_ms,
            int(r.ttft_ms is not None),
            r.ttft_ms or 0.0,
        ]
        for i, v in enumerate(values):
            row[i] += v
        row[9 + bisect.bisect_left(ROLLUP_BOUNDS_MS, r.latency_ms)] += 1
        if r.ttft_ms is not None:
            row[9 + 12 + bisect.bisect_left(ROLLUP_BOUNDS_MS, r.ttft_ms)] += 1
    return sums


_COLUMNS = (
    "hour, principal, model, provider, outcome, requests, errors, fallbacks, prompt_tokens, "
    "completion_tokens, cost, latency_ms_sum, ttft_count, ttft_ms_sum, "
    + ", ".join(f"latency_b{i}" for i in range(12))
    + ", "
    + ", ".join(f"ttft_b{i}" for i in range(12))
)


def same(rollup: list[tuple[Any, ...]], want: dict[tuple[Any, ...], list[Any]]) -> None:
    got = {tuple(r[:5]): list(r[5:]) for r in rollup}
    assert set(got) == set(want)
    for key, values in want.items():
        row = got[key]
        for i, (a, b) in enumerate(zip(row, values, strict=True)):
            if isinstance(b, float):  # sums of floats: the order of adding moves the last bit
                assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12), (key, i, a, b)
            else:
                assert a == b, (key, i, a, b)


def run(opener: Opener, work: Callable[[Database], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        db = await opener()
        try:
            return await work(db)
        finally:
            await db.aclose()

    return asyncio.run(main())


def test_the_rollup_is_exactly_the_ledger(opener: Opener) -> None:
    written = records(600)

    async def work(db: Database) -> None:
        ledger = Ledger(db, batch_max=64)
        ledger.start()
        for r in written[:400]:
            ledger.submit(r)
        await ledger.commit(written[400])
        # Resubmitted duplicates (a retried batch, a client's retry of a recorded request) are
        # skipped by the ledger's insert, and so by the rollup.
        for r in [*written[:150], *written[401:]]:
            ledger.submit(r)
        await ledger.commit(written[0])
        await ledger.aclose()
        rollup = await db.fetchall(f"SELECT {_COLUMNS} FROM usage_hourly")  # noqa: S608
        same(rollup, expected(written))
        # The same against the ledger's own GROUP BY, in SQL.
        hour = (
            "CAST(created_at / 3600 AS INTEGER) * 3600"
            if db.dialect == "sqlite"
            else "(floor(created_at / 3600) * 3600)::bigint"
        )
        by_sql = await db.fetchall(
            f"SELECT {hour}, principal, coalesce(model, model_requested), coalesce(provider, ''), "  # noqa: S608
            "coalesce(error, ''), count(*), sum(prompt_tokens), sum(completion_tokens) "
            "FROM ledger GROUP BY 1, 2, 3, 4, 5"
        )
        sums = {tuple(r[:5]): [int(v) for v in r[5:]] for r in by_sql}
        assert sums == {k: [v[0], v[3], v[4]] for k, v in expected(written).items()}
        # And the pages' totals read the rollup back the same.
        total = await queries.summary(db, BASE)
        assert total.requests == len(written)
        assert total.prompt_tokens == sum(r.prompt_tokens for r in written)
        assert math.isclose(total.cost, math.fsum(r.cost for r in written), rel_tol=1e-12)
        assert sum(total.latency) == len(written)
        assert sum(total.ttft) == sum(r.ttft_ms is not None for r in written)

    run(opener, work)


# The ledger's columns at schema version 3, in the order Record.row() gives them.
V3_COLUMNS = (
    "request_id", "principal", "end_user", "metadata", "model_requested", "model", "provider",
    "attempts", "prompt_tokens", "completion_tokens", "cost", "latency_ms", "ttft_ms", "status",
    "error", "finish_reason", "stream", "created_at", "finished_at", "route",
)  # fmt: skip


def test_records_before_the_rollup_are_backfilled(tmp_path: Path) -> None:
    """A store made by the previous version, with records in it, migrates to an exact rollup."""
    path = tmp_path / "llmrouter.sqlite3"
    old = records(300, seed=11)
    with sqlite3.connect(path, isolation_level=None) as db:
        for migration in MIGRATIONS[:3]:
            for statement in migration.sqlite:
                db.execute(statement)
        db.execute("PRAGMA user_version = 3")
        rows = [r.row()[: len(V3_COLUMNS)] for r in old]
        db.executemany(
            f"INSERT INTO ledger ({', '.join(V3_COLUMNS)}) "  # noqa: S608
            f"VALUES ({', '.join('?' * len(V3_COLUMNS))})",
            rows,
        )
    new = records(50, seed=12)
    for i, r in enumerate(new):
        r.request_id = f"new-{i}"

    async def main() -> None:
        db = await open_database(None, tmp_path)
        try:
            ledger = Ledger(db)
            ledger.start()
            for r in new:
                ledger.submit(r)
            await ledger.aclose()
            same(await db.fetchall(f"SELECT {_COLUMNS} FROM usage_hourly"), expected([*old, *new]))  # noqa: S608
        finally:
            await db.aclose()

    asyncio.run(main())


class Recording:
    """The real database, keeping the SQL of every read."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.sql: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def fetchall(self, sql: str, *args: Any, heavy: bool = False) -> list[Any]:
        self.sql.append(sql)
        return await self._db.fetchall(sql, *args, heavy=heavy)


def test_the_log_pages_through_every_record_once(opener: Opener) -> None:
    written = records(530, seed=3)
    # Ties on created_at: the keyset's second column, the request id, orders them.
    for r in written[:40]:
        r.created_at = BASE + 7 * HOUR + 0.5

    async def work(db: Database) -> None:
        ledger = Ledger(db)
        ledger.start()
        for r in written:
            ledger.submit(r)
        await ledger.aclose()
        recording = Recording(db)
        filters: list[tuple[queries.LogFilter, Callable[[Record], bool]]] = [
            (queries.LogFilter(since=0.0), lambda r: True),
            (queries.LogFilter(since=BASE + 10 * HOUR), lambda r: r.created_at >= BASE + 10 * HOUR),
            (queries.LogFilter(since=0.0, principal="key:a"), lambda r: r.principal == "key:a"),
            (
                queries.LogFilter(since=0.0, model="alias"),
                lambda r: (r.model or r.model_requested) == "alias",
            ),
            (queries.LogFilter(since=0.0, provider="p2"), lambda r: r.provider == "p2"),
            (
                queries.LogFilter(since=0.0, status="failed"),
                lambda r: r.status >= 400 or r.error is not None,
            ),
            (
                queries.LogFilter(since=0.0, status="ok"),
                lambda r: r.status < 400 and r.error is None,
            ),
            (
                queries.LogFilter(since=0.0, status="429", principal="key:b"),
                lambda r: r.status == 429 and r.principal == "key:b",
            ),
        ]
        for where, keep in filters:
            want = sorted(
                (r for r in written if keep(r)),
                key=lambda r: (r.created_at, r.request_id),
                reverse=True,
            )
            seen: list[str] = []
            cursor = None
            pages = 0
            while True:
                page = await queries.log_page(recording, where, cursor, limit=37)  # type: ignore[arg-type]
                assert len(page.rows) <= 37
                seen += [row.request_id for row in page.rows]
                pages += 1
                if page.next is None:
                    break
                # The cursor survives its trip through a URL.
                cursor = queries.Cursor.decode(page.next.encode())
                assert cursor == page.next
            assert seen == [r.request_id for r in want], where
            assert pages == max(1, math.ceil(len(want) / 37))
        assert recording.sql and all("LIMIT ?" in sql for sql in recording.sql)
        assert not any("count(" in sql.lower() for sql in recording.sql)

    run(opener, work)


def test_a_grouping_names_the_top_groups_and_folds_the_rest(opener: Opener) -> None:
    """However many keys and models the rollup holds, a chart's query returns at most top + 1
    groups a step: the top ones by the ranked figure, and the rest summed in one (None)."""
    rng = random.Random(11)
    written = [
        Record(
            request_id=f"many-{i:05d}",
            principal=f"key:k{i % 300:04d}",
            model_requested=f"m{i % 250}",
            model=f"m{i % 250}",
            provider="p1",
            attempts=[],
            prompt_tokens=rng.randrange(100),
            completion_tokens=rng.randrange(100),
            cost=rng.random(),
            latency_ms=10.0,
            ttft_ms=None,
            status=200,
            error=None,
            stream=False,
            created_at=BASE + (i % 3) * HOUR + 1,
            finished_at=BASE + (i % 3) * HOUR + 2,
        )
        for i in range(900)
    ]

    async def work(db: Database) -> None:
        ledger = Ledger(db)
        ledger.start()
        for r in written:
            ledger.submit(r)
        await ledger.aclose()
        recording = Recording(db)
        for by, group, rank, figure in (
            ("key", lambda r: r.principal, "cost", lambda r: r.cost),
            ("model", lambda r: r.model, "tokens", lambda r: r.prompt_tokens + r.completion_tokens),
        ):
            points = await queries.series(recording, BASE, HOUR, by=by, top=8, rank=rank)  # type: ignore[arg-type]
            groups = {p.group for p in points}
            assert len(groups) == 9 and None in groups
            assert len(points) <= 3 * 9  # three hours, nine groups each: all the SQL returned
            totals: dict[str, float] = defaultdict(float)
            for r in written:
                totals[group(r)] += figure(r)
            top = sorted(totals, key=lambda g: (-totals[g], g))[:8]
            assert groups - {None} == set(top), by
            value = (lambda p: p.cost) if rank == "cost" else (lambda p: p.tokens)
            rest = sum(value(p) for p in points if p.group is None)
            assert math.isclose(rest, sum(totals[g] for g in totals if g not in top), rel_tol=1e-9)
            assert sum(p.requests for p in points) == len(written)
        # Fewer groups than the top: each is named, and there is no rest.
        points = await queries.series(db, BASE, HOUR, by="provider", top=8)
        assert {p.group for p in points} == {"p1"}
        assert sum(p.requests for p in points) == len(written)

    run(opener, work)


def test_the_pages_name_only_the_keys_they_show(opener: Opener) -> None:
    """The log, a request's page and the usage page look their keys' names up by id, never
    reading every key (there are 300 here; three have traffic)."""

    class Names(Keys):
        def __init__(self, db: Database) -> None:
            super().__init__(db)
            self.asked: set[str] = set()

        async def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
            raise AssertionError("a page read every key")

        async def names(self, ids: Collection[str]) -> dict[str, str]:
            self.asked |= set(ids)
            return await super().names(ids)

    async def work(db: Database) -> None:
        keys = Names(db)
        made = [(await keys.create(f"key-{i}"))[0] for i in range(300)]
        busy = made[7], made[150], made[299]
        now = time.time()
        ledger = Ledger(db)
        ledger.start()
        for i, key in enumerate(busy):
            ledger.submit(
                Record(
                    request_id=f"named-{i}",
                    principal=f"key:{key.id}",
                    model_requested="m1",
                    model="m1",
                    provider="p1",
                    attempts=[],
                    prompt_tokens=3,
                    completion_tokens=2,
                    cost=0.5,
                    latency_ms=10.0,
                    ttft_ms=None,
                    status=200,
                    error=None,
                    stream=False,
                    created_at=now - 60,
                    finished_at=now - 59,
                )
            )
        await ledger.aclose()
        ctx = SimpleNamespace(settings=embedded_default(), db=db, keys=keys, ledger=ledger)
        dashboard = Dashboard(ctx)  # type: ignore[arg-type]
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def visit(path: str, query: dict[str, str], page: Callable[[Any], Awaitable[None]]) -> str:
            scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
            req = Request(scope, None, send, "req-test")  # type: ignore[arg-type]
            sent.clear()
            keys.asked = set()
            session = Session(busy[0].id, "csrf", int(now) + 60)
            await page(_Visit(req, ctx, session, path, query))  # type: ignore[arg-type]
            assert sent[0]["status"] == 200
            return bytes(sent[1]["body"]).decode()

        ids = {k.id for k in busy}
        for path, query, page in (
            ("/admin/log", {}, dashboard.request_log),
            ("/admin/usage", {"by": "key"}, dashboard.usage),
            ("/admin/usage", {"by": "model"}, dashboard.usage),
        ):
            html = await visit(path, query, page)
            assert keys.asked == ids, path
            assert all(f"key-{made.index(k)}" in html for k in busy), path
        await visit("/admin/log/named-1", {}, lambda v: dashboard._request(v, "named-1"))
        assert keys.asked == {busy[1].id}

    run(opener, work)
