"""The rollup under several writers on one PostgreSQL: replicas' ledgers writing overlapping
rollup rows at once never deadlock, and a replica of the release before, writing while another
migrates the schema to the rollup, loses no record from it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

import llmrouter.accounts.store as store
from llmrouter.accounts.ledger import Ledger, Record
from tests.conftest import PG_URL

pytestmark = pytest.mark.timeout(120)


def record(request_id: str, principal: str, created_at: float) -> Record:
    return Record(
        request_id=request_id,
        principal=principal,
        model_requested="m",
        model="m",
        provider="p",
        attempts=["p/m ok 1ms"],
        prompt_tokens=1,
        completion_tokens=1,
        cost=0.1,
        latency_ms=5.0,
        status=200,
        created_at=created_at,
        finished_at=created_at + 0.005,
    )


def test_two_replicas_writing_the_same_rollup_rows_never_deadlock(
    pg_schema: str, tmp_path: Path
) -> None:
    async def run() -> tuple[int, int]:
        dbs = [await store.open_database(PG_URL, tmp_path, schema=pg_schema) for _ in range(2)]
        failures = [0]

        def failed() -> None:
            failures[0] += 1

        ledgers = [Ledger(db, on_write_error=failed) for db in dbs]
        for ledger in ledgers:
            ledger.start()
        now = time.time()
        keys = [f"key:k{j}" for j in range(20)]
        for round_ in range(30):  # each replica's batch in the other's reverse order
            orders = (keys, keys[::-1])
            await asyncio.gather(
                *(
                    ledger.commit(record(f"{round_}-{side}-{k}", k, now))
                    for side, (ledger, order) in enumerate(zip(ledgers, orders, strict=True))
                    for k in order
                )
            )
        for ledger in ledgers:
            await ledger.aclose()
        row = await dbs[0].fetchone("SELECT sum(requests) FROM usage_hourly")
        for db in dbs:
            await db.aclose()
        return failures[0], int(row[0]) if row else 0

    failures, rolled = asyncio.run(run())
    assert failures == 0  # a deadlock is a failed batch (retried, the response kept waiting)
    assert rolled == 30 * 2 * 20


def test_a_record_written_during_the_rollups_migration_is_in_it(
    pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> tuple[int, int, int]:
        version = next(
            i for i, m in enumerate(store.MIGRATIONS) if "usage_hourly" in " ".join(m.postgres)
        )
        monkeypatch.setattr(store, "MIGRATIONS", store.MIGRATIONS[:version])  # the release before
        db = await store.open_database(PG_URL, tmp_path, schema=pg_schema)
        await db.aclose()
        monkeypatch.undo()
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_schema})
        insert = """INSERT INTO ledger (request_id, principal, model_requested, model, provider,
            attempts, prompt_tokens, completion_tokens, cost, latency_ms, status, stream,
            created_at, finished_at) VALUES ($1, 'key:k', 'm', 'm', 'p', '["p/m ok 1ms"]', 1, 1,
            0.1, 5, 200, false, 1796170000, 1796170000)"""
        await conn.execute(
            insert.replace("VALUES ($1,", "SELECT 'old-' || i,").replace(
                "1796170000)", "1796170000 FROM generate_series(1, 100000) i"
            )
        )
        stop, written = False, 0

        async def old_replica() -> None:  # still on the release before, writing records
            nonlocal written
            other = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_schema})
            while not stop:
                await other.execute(insert, f"new-{written}")
                written += 1
            await other.close()

        writer = asyncio.create_task(old_replica())
        await asyncio.sleep(0.2)
        migrated = await store.open_database(PG_URL, tmp_path, schema=pg_schema)  # to the rollup
        await asyncio.sleep(0.2)
        stop = True
        await writer
        ledger = await conn.fetchval("SELECT count(*) FROM ledger")
        rolled = await conn.fetchval("SELECT sum(requests) FROM usage_hourly")
        await migrated.aclose()
        await conn.close()
        return ledger, int(rolled), written

    ledger, rolled, written = asyncio.run(run())
    assert written > 0
    assert rolled == ledger
