"""The usage ledger: one record per completion request — answered, failed or cancelled.

A response's last bytes wait for its record to be durable, so a client that received a whole
response can trust that it was recorded, even if the server is killed the next moment. With a
journal (the server's way, journal.py) durable means written to this process's journal file (one
`write` on the event loop for the records of a loop turn); without one (or when the journal
cannot be written), committed to the database. Records go into the database off the request
path, by one writer task, in batches (group commit): journaled records, which no response waits
for, are gathered for `GATHER_SECONDS` before each transaction; a record a response waits for
goes at once, with whatever has arrived while the previous batch was committing. The insert is
idempotent on the request id: a batch retried after an ambiguous failure, or replayed from a
journal, never writes a record twice. A store that is down is retried with backoff, records
kept in memory (and in the journal); a response that waits for the database waits at most
`durable_timeout` seconds, and then is released with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec

from llmrouter.accounts.journal import Journal, Segment
from llmrouter.accounts.store import (
    LEDGER_COLUMNS,
    Database,
    DataRejected,
    StoreError,
    rollup_order,
)

__all__ = ["COLUMNS", "GATHER_SECONDS", "GROUPINGS", "Ledger", "Record", "Total"]

log = logging.getLogger("llmrouter.ledger")

COLUMNS = _COLUMNS = LEDGER_COLUMNS  # (beside the schema in store.py, which replay checks against)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM ledger"  # noqa: S608
# How long the writer gathers journaled records into one transaction. Each commit has a fixed
# cost (an fsync, a thread hand-off, the WAL's bookkeeping: about 1 ms of CPU here, against some
# 50 µs a record), which at 10 ms was most of the ledger's cost at c1 (bench/README.md); other
# processes reading the database see a record this much later.
GATHER_SECONDS = 0.1
_encode = msgspec.json.encode


class Record(msgspec.Struct, kw_only=True, omit_defaults=False):
    request_id: str
    principal: str
    user: str | None = None
    metadata: dict[str, str] | None = None
    model_requested: str
    model: str | None = None
    provider: str | None = None
    attempts: list[str] = []
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: float
    ttft_ms: float | None = None
    status: int
    error: str | None = None
    finish_reason: str | None = None
    stream: bool = False
    created_at: float
    finished_at: float
    route: str = "completions"  # the API it came in on: "completions", "chat.completions"
    # Only with `accounts.store_prompts` on (else None), cut to `stored_text_chars`.
    prompt_text: str | None = None
    answer_text: str | None = None

    def row(self) -> tuple[Any, ...]:
        """The record as the ledger's columns. `user` and `metadata` are JSON, so that any
        character survives (PostgreSQL text cannot hold NUL); the other text comes from the
        router or was checked at the edge, and a NUL in it would be replaced, not refused."""
        return (
            _text(self.request_id),
            _text(self.principal),
            None if self.user is None else _encode(self.user).decode(),
            None if self.metadata is None else _encode(self.metadata).decode(),
            _text(self.model_requested),
            _text(self.model),
            _text(self.provider),
            _encode(self.attempts).decode(),
            _int64(self.prompt_tokens),  # an upstream's absurd count is kept, clamped
            _int64(self.completion_tokens),
            self.cost,
            self.latency_ms,
            self.ttft_ms,
            self.status,
            _text(self.error),
            _text(self.finish_reason),
            self.stream,
            self.created_at,
            self.finished_at,
            self.route,
            _text(self.prompt_text),
            _text(self.answer_text),
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Record:
        fields = dict(zip(_COLUMNS, row, strict=True))
        user, metadata = fields.pop("end_user"), fields["metadata"]
        fields["user"] = None if user is None else msgspec.json.decode(user)
        fields["metadata"] = None if metadata is None else msgspec.json.decode(metadata)
        fields["attempts"] = msgspec.json.decode(fields["attempts"])
        fields["stream"] = bool(fields["stream"])
        return cls(**fields)


def _in_journal(entry: _Entry) -> bool:
    """Whether an entry's record is in the journal (or on its way there this turn). One whose
    commit was cancelled (its client left) is not known to be: its write no longer says."""
    landing = entry[4]  # (an entry has one exactly when it went to a journal segment)
    if landing is None:
        return False
    return not landing.done() or (not landing.cancelled() and landing.result() is None)


def _int64(value: int) -> int:
    return min(max(value, -(2**63)), 2**63 - 1)


def _text(value: str | None) -> Any:
    return value.replace("\x00", "\ufffd") if value is not None and "\x00" in value else value


Grouping = Literal["key", "model", "provider", "day"]
GROUPINGS: tuple[Grouping, ...] = ("key", "model", "provider", "day")


class Total(msgspec.Struct):
    group: str
    requests: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


# A record, done when it is in the database; the journal segment it went to (if it did), its row
# as the journal has it (encoded once, used twice), and its loop turn's write to the journal
# (None once written, else the error that kept it out).
_Landing = asyncio.Future[OSError | None]
_Entry = tuple[Record, asyncio.Future[None], Segment | None, tuple[Any, ...] | None, _Landing | None]


class Ledger:
    def __init__(
        self,
        db: Database,
        *,
        journal: Journal | None = None,
        batch_max: int = 512,
        durable_timeout: float = 10.0,
        max_pending: int = 100_000,
        gather_seconds: float = GATHER_SECONDS,
        on_write_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._journal = journal
        self._on_write_error = on_write_error
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._durable_timeout = durable_timeout
        self._pending: list[_Entry] = []
        self._writing: list[_Entry] = []  # the batch being written now
        self._last: asyncio.Future[None] | None = None  # the latest record's: done, all are
        self._wakeup = asyncio.Event()
        self._hurry = asyncio.Event()  # write what is pending now, without gathering more
        self._flushing: asyncio.Future[None] | None = None  # no gathering until this is written
        self._gather_seconds = gather_seconds if journal is not None else 0.0
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._journal_warned = 0.0
        if journal is not None:
            journal.on_error = self._journal_failed

    @property
    def pending(self) -> int:
        """Records waiting to be written."""
        return len(self._pending)

    @property
    def backlogged(self) -> bool:
        """So many records wait (the store is down or slow) that new requests should wait too:
        serving them could not be recorded, and memory would grow without bound."""
        return len(self._pending) >= self._max_pending

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_forever())
        if self._journal is not None:
            self._journal.start()

    def submit(self, record: Record) -> asyncio.Future[None]:
        """Queue a record (journaled, where there is a journal); the future is done when it is
        in the database."""
        return self._queue(record, *self._journaled(record))

    async def commit(self, record: Record) -> None:
        """Queue a record and wait until it is durable: journaled (and, with `sync: full`,
        fdatasync'ed), else in the database (or the durability timeout passes)."""
        segment, row, landing = self._journaled(record)
        done = self._queue(record, segment, row, landing)
        if landing is not None and await landing is None:  # (this turn's write: in the file)
            assert self._journal is not None
            if not self._journal.unsynced:  # (no `wait_for`: its task and timer cost a request)
                return
            try:
                await asyncio.wait_for(self._journal.synced(), self._durable_timeout)
            except TimeoutError:  # (only with `sync: full`: a disk that cannot sync)
                log.warning(
                    "the ledger's journal is not synced yet; releasing the response",
                    extra={"fields": {"request_id": record.request_id}},
                )
            return
        try:
            await asyncio.wait_for(asyncio.shield(done), self._durable_timeout)
        except TimeoutError:
            log.warning(
                "the ledger is not durable yet; releasing the response, its record stays queued",
                extra={"fields": {"request_id": record.request_id}},
            )

    async def flush(self, patience: float | None = None) -> None:
        """Until every record queued so far is in the database (or `patience` seconds, by
        default the durability timeout): a read of the ledger that follows sees what this process
        has answered."""
        last = self._last
        if last is not None and not last.done():
            self._flushing = last  # (the latest: once it is written, so is all before it)
            self._hurry.set()
            with contextlib.suppress(TimeoutError):
                wait = self._durable_timeout if patience is None else patience
                await asyncio.wait_for(asyncio.shield(last), wait)

    def _journaled(
        self, record: Record
    ) -> tuple[Segment | None, tuple[Any, ...] | None, _Landing | None]:
        """The record added to this turn's journal write: its segment, its row, and the write's
        future (no segment and no future if it cannot be journaled at all)."""
        journal = self._journal
        if journal is None:
            return None, None, None
        row = record.row()
        try:
            segment, landing = journal.append(row)
        except OSError as exc:
            self._journal_failed(exc)
            return None, row, None
        return segment, row, landing

    def _journal_failed(self, exc: OSError) -> None:
        """A full or failing disk: the records concerned go to the database now, and their
        answers wait for its commit."""
        self._hurry.set()
        self._on_write_error()
        now = time.monotonic()
        if now - self._journal_warned > 60:
            self._journal_warned = now
            log.error("cannot write the ledger's journal (%s): answers wait for the database", exc)

    def _queue(
        self,
        record: Record,
        segment: Segment | None,
        row: tuple[Any, ...] | None = None,
        landing: _Landing | None = None,
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, done, segment, row, landing))
        self._last = done
        self._wakeup.set()
        if segment is None or len(self._pending) >= self._batch_max:
            self._hurry.set()  # an answer waits for this one, or a batch is full
        return done

    def _gathering(self) -> bool:
        """Whether the writer may wait for more before its next transaction: nobody asked
        for one now, the batch is not full, and every record waiting is in the journal."""
        if self._flushing is not None and self._flushing.done():
            self._flushing = None
        return (
            not self._hurry.is_set()
            and self._flushing is None
            and not self._closing
            and len(self._pending) < self._batch_max
            and all(_in_journal(entry) for entry in self._pending)
        )

    async def _write_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if self._gather_seconds and self._gathering():
                    # Nobody waits for these (they are in the journal): gather a batch's worth,
                    # before every transaction, so that a server makes one of many requests, not
                    # one of each few that came during the last commit (which is what a gather
                    # only when the writer woke up did, under load, all the time).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._gather_seconds)
                self._hurry.clear()  # (what it asked for goes now; a later ask stays set)
                batch = self._pending[: self._batch_max]
                del self._pending[: self._batch_max]
                self._writing = batch
                await self._write(batch)
                self._writing = []
            if self._closing:
                return

    async def _write(self, batch: list[_Entry]) -> None:
        """Write a batch, retrying while the store is unreachable. If the store refuses the data
        itself, the records are written one by one, so that one record it cannot hold (logged in
        full, then dropped) does not stop the others."""
        delay = 0.05
        while True:
            try:
                # In the order of the rollup rows their trigger updates: two writers (replicas on
                # one PostgreSQL) then take those rows' locks in one order, and never deadlock.
                rows = [row if row is not None else record.row() for record, _, _, row, _ in batch]
                rows.sort(key=rollup_order)
                await self._db.insert_rows("ledger", _COLUMNS, rows, key="request_id")
                break
            except StoreError as exc:
                self._on_write_error()
                if isinstance(exc, DataRejected):
                    await self._reject(batch, exc)
                    return
                log.warning(
                    "ledger write failed; retrying",
                    extra={"fields": {"records": len(batch), "error": str(exc), "retry_in": delay}},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception as exc:  # a value no store could take: never a dead writer
                self._on_write_error()
                await self._reject(batch, exc)
                return
        self._written(batch)

    def _written(self, batch: list[_Entry]) -> None:
        if self._journal is not None:
            self._journal.committed([segment for _, _, segment, _, _ in batch if segment is not None])
        for _, done, _, _, _ in batch:
            if not done.done():
                done.set_result(None)

    async def _reject(self, batch: list[_Entry], exc: Exception) -> None:
        if len(batch) > 1:
            for one in batch:
                await self._write([one])
            return
        record = batch[0][0]
        log.error(
            "the store refused a ledger record; it is kept here only",
            extra={"fields": {"error": repr(exc), "record": msgspec.to_builtins(record)}},
        )
        self._written(batch)  # (out of the journal too: a replay would be refused the same)

    async def aclose(self, grace: float = 10.0) -> None:
        """Write what is queued (for at most `grace` seconds), then stop."""
        self._closing = True
        self._wakeup.set()
        self._hurry.set()
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), grace)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._pending:
            kept = sum(_in_journal(entry) for entry in self._pending)
            log.error(
                "the ledger closed with %d records unwritten; %d of them are in its journal, "
                "for the next start",
                len(self._pending),
                kept,
            )
        if self._journal is not None:
            self._journal.close(drained=not self._pending and not self._writing)

    # -- reading ---------------------------------------------------------------------------------

    async def get(self, request_id: str) -> Record | None:
        for record, _, _, _, _ in itertools.chain(self._writing, self._pending):
            if record.request_id == request_id:
                return record  # answered, not in the database yet
        row = await self._db.fetchone(f"{_SELECT} WHERE request_id = ?", request_id)
        return None if row is None else Record.from_row(row)

    async def spent(self, principal: str, since: float) -> float:
        """The cost recorded for `principal` since a unix time: credits already used."""
        await self.flush()
        row = await self._db.fetchone(
            "SELECT coalesce(sum(cost), 0) FROM ledger WHERE principal = ? AND created_at >= ?",
            principal,
            since,
            heavy=True,
        )
        return float(row[0]) if row else 0.0

    async def totals(
        self, *, since: float | None = None, until: float | None = None, by: Grouping = "model"
    ) -> list[Total]:
        await self.flush()
        column = {
            "key": "principal",
            "model": "coalesce(model, model_requested)",
            "provider": "coalesce(provider, '')",
            "day": (
                "date(created_at, 'unixepoch')"
                if self._db.dialect == "sqlite"
                else "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            ),
        }[by]
        rows = await self._db.fetchall(
            f"SELECT {column} AS g, count(*), sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "  # noqa: S608
            "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
            "coalesce(sum(cost), 0) FROM ledger WHERE created_at >= ? AND created_at < ? "
            "GROUP BY g ORDER BY g",
            0.0 if since is None else since,
            1e18 if until is None else until,
            heavy=True,
        )
        return [Total(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), float(r[5])) for r in rows]
