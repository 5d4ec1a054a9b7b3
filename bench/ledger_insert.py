"""The SQLite writer's CPU per ledger record: `Database.insert_rows` alone, in batches of 1, 8
and 45 records (a quiet c1 gathers few, a c64 load some 45), on a fresh database with its
durability (synchronous=FULL).

    .venv/bin/python bench/ledger_insert.py [--records 3000] [--label NAME]

The CPU is this process's (user + system), which is the writer thread's while the event loop
waits for it. To compare revisions, run it with each one's `src` on PYTHONPATH, in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ledger import record
from llmrouter.accounts.ledger import COLUMNS
from llmrouter.accounts.store import open_database


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(batch: int, n: int) -> tuple[float, float]:
    db = await open_database(None, Path(tempfile.mkdtemp()), sync="full")
    rows = [record().row() for _ in range(n)]
    c0, t0 = cpu(), time.perf_counter()
    for i in range(0, n, batch):
        await db.insert_rows("ledger", COLUMNS, rows[i : i + batch], key="request_id")
    took = cpu() - c0, time.perf_counter() - t0
    await db.aclose()
    return took[0] / n * 1e6, took[1] / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    for batch in (1, 8, 45):
        n = args.records if batch > 1 else args.records // 5
        cpu_us, wall_us = asyncio.run(measure(batch, n))
        print(f"| {args.label} | {batch} | {cpu_us:.1f} | {wall_us:.1f} |")


if __name__ == "__main__":
    main()
