"""What a durable ledger record costs a response: the wait in `Ledger.commit` (the time a response's
last byte is held), alone and under concurrency, on SQLite (synchronous=FULL) and PostgreSQL.

    .venv/bin/python bench/ledger.py [--records 5000] [--database-url postgresql://...]

For each store and concurrency (1, 16, 64 writers, each committing one record after another): the
p50/p99 commit wait, records per second, and the mean batch size the group commit formed. Runs in
one process on one event loop, like a server worker; nothing else is running.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmrouter.accounts.ledger import Ledger, Record
from llmrouter.accounts.store import Database, open_database


class Counting:
    """The database, counting the ledger's transactions."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str
    ) -> None:
        self.batches += 1
        await self.db.insert_rows(table, columns, rows, key=key)


def record() -> Record:
    now = time.time()
    return Record(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        principal="key:bench",
        metadata={"team": "bench"},
        model_requested="mock/model",
        model="mock/model",
        provider="mock",
        attempts=["mock/mock-model ok 1ms"],
        prompt_tokens=12,
        completion_tokens=16,
        cost=0.000123,
        latency_ms=1.5,
        status=200,
        finish_reason="length",
        created_at=now,
        finished_at=now,
    )


async def measure(db: Database, concurrency: int, records: int) -> dict[str, float]:
    counting = Counting(db)
    ledger = Ledger(counting)  # type: ignore[arg-type]
    ledger.start()
    waits: list[float] = []
    per_writer = records // concurrency

    async def writer() -> None:
        for _ in range(per_writer):
            started = time.perf_counter()
            await ledger.commit(record())
            waits.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await ledger.aclose()
    waits.sort()
    return {
        "p50_ms": 1000 * statistics.median(waits),
        "p99_ms": 1000 * waits[int(0.99 * (len(waits) - 1))],
        "per_s": len(waits) / elapsed,
        "batch": len(waits) / max(1, counting.batches),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--database-url", help="also measure this PostgreSQL")
    args = parser.parse_args()
    stores: list[tuple[str, str | None, str | None]] = [("SQLite", None, None)]
    if args.database_url:
        stores.append(("PostgreSQL", args.database_url, f"bench_ledger_{uuid.uuid4().hex[:8]}"))
    print("| store | writers | commit wait p50 | p99 | records/s | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, url, schema in stores:
        with tempfile.TemporaryDirectory() as home:
            db = await open_database(url, Path(home), schema=schema)
            try:
                for concurrency in (1, 16, 64):
                    count = args.records if concurrency > 1 else args.records // 5
                    r = await measure(db, concurrency, count)
                    print(
                        f"| {name} | {concurrency} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
                        f"{r['per_s']:,.0f} | {r['batch']:.1f} |",
                        flush=True,
                    )
                if schema is not None:
                    await db.execute(f"DROP SCHEMA {schema} CASCADE")
            finally:
                await db.aclose()


if __name__ == "__main__":
    asyncio.run(main())
