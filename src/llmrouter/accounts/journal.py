"""The ledger's journal: a record is durable against a killed process the moment it is written here.

A response's last bytes wait for its record. Waiting for a database commit (a thread hand-off and
an fsync, a network round trip for PostgreSQL) would put the disk's tail into every answer's
latency; a `write` to a file in the page cache costs a few microseconds, and what it wrote
survives the process being killed (`kill -9`, an OOM kill, a crash), because it is the kernel's
now. So the event loop appends each record to this process's journal file, the records of one
turn of the loop with one `write` at the turn's end (their responses wait for it: a group commit
that costs a loop turn, not a timer), the ledger's writer moves records into the database in
batches as before, and a journal file whose records are all in the database is deleted.
Whatever a dead process left is put into the database by the next process that opens it
(`replay`), idempotently: the insert skips request ids it has.

A power cut is another matter: the page cache is lost with it. `sync` decides:
- `normal`: the journal is fdatasync'ed once a second while it holds records the database has not
  committed; a power cut loses at most the records of about the last second.
- `full`: a record is fdatasync'ed before its response is released (one fdatasync covers every
  record written before it, so concurrent requests share it); a power cut loses nothing a client
  received whole.
The database's own commits are always synchronous (SQLite `synchronous=FULL`): a journal file is
deleted only once its records are on disk there.

Files are `<folder>/<pid>-<ns>-<n>.jsonl`: a header line naming the table, columns and key, then
one JSON array per record. Each is created under a dot-name, locked (`flock`) and then renamed, so
a file with its final name is always either locked by its live owner or an orphan to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

if TYPE_CHECKING:
    from llmrouter.accounts.store import Database

__all__ = ["Journal", "Segment", "replay"]

log = logging.getLogger("llmrouter.ledger")

_SEGMENT_BYTES = 8 << 20  # a new file after this many bytes; the old one goes once it is drained
_NORMAL_SYNC_SECONDS = 1.0
_REPLAY_BATCH = 512
_HIDDEN_GRACE_SECONDS = 60.0
_encode = msgspec.json.encode


class _Header(msgspec.Struct, frozen=True):
    table: str
    columns: list[str]
    key: str


@dataclass(eq=False)
class Segment:
    """One journal file: open (and locked) until every record in it is in the database."""

    path: Path
    fd: int
    size: int = 0
    outstanding: int = 0  # records for this file (written, held, or failed to be) not in the database
    dirty: bool = False  # written since its last fdatasync
    broken: bool = False  # a failed write could not be cut off: no more records here
    closed: bool = field(default=False, repr=False)


class Journal:
    def __init__(
        self,
        folder: Path,
        *,
        table: str,
        columns: Sequence[str],
        key: str,
        sync: Literal["full", "normal"] = "normal",
    ) -> None:
        self.folder = folder
        self._header = _encode(_Header(table, list(columns), key)) + b"\n"
        self._sync = sync
        self._serial = 0
        self._segments: list[Segment] = []  # the last is the one written to
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="llmrouter-journal")
        self._written = 0  # records written, in all
        self._synced = 0  # of those, the first `_synced` are fdatasync'ed
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._held: list[bytes] = []  # this turn's records, for the last segment, not written yet
        self._landings: list[asyncio.Future[OSError | None]] = []  # theirs, each done when written
        self._write_soon = False  # the turn's write is scheduled
        self.on_error: Callable[[OSError], None] = lambda exc: None  # a turn's write failed
        self._sync_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._segments.append(self._new_segment())

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    # -- the event loop's side ------------------------------------------------------------------

    def append(self, row: Sequence[Any]) -> tuple[Segment, asyncio.Future[OSError | None]]:
        """Add one record to this loop turn's write, which goes to the file with one `write` at
        the turn's end (`write`); the segment it goes to, and a future of its own: None once it
        is in the file, or the OSError that kept it out (the file is then cut back to its last
        whole record). An OSError here (a closed journal, no new file) means not journaled."""
        if not self._segments:
            raise OSError("the ledger's journal is closed")
        segment = self._segments[-1]
        if segment.size >= _SEGMENT_BYTES or segment.broken:
            self.write()  # what the turn holds goes to the old file, the rest to the new one
            segment = self._rotate()
        loop = asyncio.get_running_loop()
        landing: asyncio.Future[OSError | None] = loop.create_future()
        self._held.append(_encode(row) + b"\n")
        self._landings.append(landing)
        segment.outstanding += 1
        if not self._write_soon:
            self._write_soon = True
            loop.call_soon(self.write)
        return segment, landing

    def write(self) -> None:
        """Write the records held (one `write`, whole, or none of it) and settle their futures."""
        self._write_soon = False
        lines, self._held = self._held, []
        landings, self._landings = self._landings, []
        failure: OSError | None = None
        try:
            if lines:
                failure = self._write_lines(b"".join(lines), len(lines))
        finally:  # (whatever happens, no commit waits forever)
            for landing in landings:
                if not landing.done():  # (a commit cancelled meanwhile cancelled its own)
                    landing.set_result(failure)
        if failure is not None:
            self.on_error(failure)

    def _write_lines(self, data: bytes, count: int) -> OSError | None:
        segment = self._segments[-1]
        try:
            _write_all(segment.fd, data)
        except OSError as exc:
            # Part of it may be in the file (a disk filling up): cut it off, so that the next
            # record starts a line of its own; if that fails too, the next goes elsewhere.
            try:
                os.ftruncate(segment.fd, segment.size)
            except OSError:
                segment.broken = True
            return exc
        segment.size += len(data)  # (a turn's records may take a file a little past its size)
        segment.dirty = True
        self._written += count
        if self._sync == "normal" and self._wakeup is not None and not self._wakeup.is_set():
            self._wakeup.set()
        return None

    @property
    def unsynced(self) -> bool:
        """With `sync: full`, something written is not fdatasync'ed yet (`synced` would wait)."""
        return self._sync == "full" and self._synced < self._written

    async def synced(self) -> None:
        """With `sync: full`, until everything written so far is fdatasync'ed; else at once."""
        if not self.unsynced:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._written, done))
        assert self._wakeup is not None, "start() first"
        self._wakeup.set()
        await done

    def committed(self, segments: Sequence[Segment]) -> None:
        """These records (one entry each) are in the database: a drained old file goes."""
        for segment in segments:
            segment.outstanding -= 1
        for segment in self._segments[:-1]:
            if segment.outstanding == 0:
                self._retire(segment)
        self._segments = [s for s in self._segments if not s.closed]

    def close(self, *, drained: bool) -> None:
        """At shutdown. `drained`: every record is in the database, so the files go too; else
        they stay, unlocked, for the next process to replay."""
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._segments:
            self.write()  # (what this turn holds: its responses are waiting for it)
        synced = True
        for segment in self._segments:
            if drained and segment.outstanding == 0:
                self._retire(segment)
            elif not segment.closed:
                try:
                    os.fdatasync(segment.fd)
                except OSError:
                    synced = False
                os.close(segment.fd)
                segment.closed = True
        self._segments = []
        if synced:  # (`sync: full`: who waits for an fdatasync has had it)
            self._synced = self._written
            for _, done in self._waiters:
                if not done.done():
                    done.set_result(None)
            self._waiters = []
        self._syncer.shutdown(wait=False)

    # -- files ------------------------------------------------------------------------------------

    def _new_segment(self) -> Segment:
        self._serial += 1
        name = f"{os.getpid()}-{time.time_ns()}-{self._serial}.jsonl"
        hidden = self.folder / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, self._header)
            os.fdatasync(fd)
            os.rename(hidden, self.folder / name)
            _sync_folder(self.folder)  # the name too survives a power cut (`sync: full`'s word)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                hidden.unlink()
            raise
        return Segment(self.folder / name, fd, size=len(self._header))

    def _rotate(self) -> Segment:
        segment = self._new_segment()
        old = self._segments[-1]
        self._segments.append(segment)
        if old.outstanding == 0:
            self._retire(old)
            self._segments.remove(old)
        return segment

    def _retire(self, segment: Segment) -> None:
        if segment.closed:
            return
        with contextlib.suppress(OSError):
            segment.path.unlink()  # while still locked: nobody replays it meanwhile
        os.close(segment.fd)
        segment.closed = True

    # -- fdatasync ---------------------------------------------------------------------------------

    async def _sync_forever(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._sync == "normal":
                await asyncio.sleep(_NORMAL_SYNC_SECONDS)  # what arrives meanwhile goes along
            target = self._written
            dirty = [s for s in self._segments if s.dirty and not s.closed]
            for segment in dirty:
                segment.dirty = False
            # Copies of the descriptors: a file drained meanwhile is closed here, not under the
            # thread's feet (its number could be another file's by then).
            fds = [os.dup(s.fd) for s in dirty]
            try:
                await loop.run_in_executor(self._syncer, _fdatasync_all, fds)
            except OSError as exc:
                for segment in dirty:
                    segment.dirty = True
                log.error("cannot fdatasync the ledger's journal: %s", exc)
                await asyncio.sleep(0.1)
                self._wakeup.set()
                continue
            self._synced = max(self._synced, target)
            waiting = []
            for upto, done in self._waiters:
                if upto <= self._synced:
                    if not done.done():
                        done.set_result(None)
                else:
                    waiting.append((upto, done))
            self._waiters = waiting
            if waiting:
                self._wakeup.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fdatasync_all(fds: list[int]) -> None:
    """fdatasync each, and close them all (they are copies)."""
    try:
        for fd in fds:
            os.fdatasync(fd)
    finally:
        for fd in fds:
            os.close(fd)


# -- after a death -----------------------------------------------------------------------------------


async def replay(
    folder: Path,
    db: Database,
    *,
    table: str,
    columns: Sequence[str],
    key: str,
    order: Callable[[list[Any]], Any] | None = None,
) -> int:
    """Put the records of every journal file no live process holds into the database, then
    delete the file; the number of records put. Idempotent: a record already there is skipped,
    and a replay cut short is done again by the next process. Each file's records go in the
    `order` its key gives (the writers' own, so that a replay beside a live writer takes the
    locks of the rows their triggers update in the same order). A file is read only as the journal
    of `table` (its header may name only those columns and that key), and no file stops the
    others, or the database from opening: one it cannot read is set aside as `*.bad`, and a
    record the database refuses is logged and dropped, as the ledger's writer does."""
    count = 0
    for path in _journal_files(folder):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # replayed by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's
            if os.fstat(fd).st_nlink == 0:
                continue  # replayed and deleted between our open and our lock
            if path.name.startswith("."):
                # Made by a process that died before naming it (it holds only a header); one
                # just made is left alone, since its maker may not have locked it yet.
                if time.time() - os.fstat(fd).st_mtime > _HIDDEN_GRACE_SECONDS:
                    path.unlink()
                continue
            with os.fdopen(os.dup(fd), "rb") as file:
                data = file.read()
            rows = _rows(path, data, table, columns, key)
            if rows is None:
                bad = path.with_name(path.name + ".bad")
                path.rename(bad)
                log.error("the journal file %s is not a ledger journal; set aside as %s", path, bad.name)
                continue
            if order is not None:
                rows.sort(key=order)
            count += await _insert(db, table, list(columns), rows, key)
            path.unlink()
        finally:
            os.close(fd)
    return count


def _journal_files(folder: Path) -> list[Path]:
    """Every journal file, oldest first: named, and hidden ones a dead process was making."""
    if not folder.is_dir():
        return []
    return sorted((*folder.glob("[!.]*.jsonl"), *folder.glob(".*.jsonl")))


def _rows(
    path: Path, data: bytes, table: str, columns: Sequence[str], key: str
) -> list[list[Any]] | None:
    """The records of one file, in `columns`' order; None if it is not a journal of `table`."""
    lines = data.split(b"\n")
    if not lines[0]:
        return []  # empty: a power cut before its header reached the disk
    try:
        header = msgspec.json.decode(lines[0], type=_Header)
    except msgspec.DecodeError:
        return None
    if header.table != table or header.key != key or not set(header.columns) <= set(columns):
        return None
    if key not in header.columns:
        return None
    rows: list[list[Any]] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        try:
            row = msgspec.json.decode(line, type=list[Any])
        except msgspec.DecodeError:
            # Only a last line can be cut (its process killed inside the write): its response
            # was never released, since a response waits for its record's whole write.
            log.warning("skipping an incomplete record at %s line %d", path, number)
            continue
        if len(row) == len(header.columns):
            by_name = dict(zip(header.columns, row, strict=True))
            rows.append([by_name.get(c) for c in columns])
    return rows


async def _insert(db: Database, table: str, columns: list[str], rows: list[list[Any]], key: str) -> int:
    from llmrouter.accounts.store import DataRejected

    put = 0
    for start in range(0, len(rows), _REPLAY_BATCH):
        batch = rows[start : start + _REPLAY_BATCH]
        try:
            await db.insert_rows(table, columns, batch, key=key)
            put += len(batch)
            continue
        except DataRejected:
            pass
        for row in batch:  # one by one, to find the record it refuses
            try:
                await db.insert_rows(table, columns, [row], key=key)
                put += 1
            except DataRejected as exc:
                log.error(
                    "the store refused a journaled ledger record; dropped",
                    extra={"fields": {"error": str(exc), "record": row}},
                )
    if put:
        log.info("replayed %d ledger records a stopped process left", put)
    return put


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
