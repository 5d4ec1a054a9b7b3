"""One pipelined connection to Redis for the limiter's script runs: each batch of commands goes
out in one write as soon as it is asked, on the one connection, and the replies (parsed in C by
hiredis) are matched to the commands in the order they were sent, as RESP guarantees. No task,
pool or timeout a command: a batch has one deadline, and a connection that misses it, or breaks,
fails every batch still waiting on it, is aborted (what Redis had not read yet is not run late),
and is made again for the next.

redis-py's pipeline did the same work in Python a command (packing each argument, a timeout a
reply, a task a write), a fifth of a request's CPU with limits in Redis (bench/README.md). Only
plain `redis://` URLs (host, port, db, user, password) are served here; `Pipe.for_url` says None
for any other (TLS, a Unix socket, options), which keep redis-py's pipeline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Pipe", "packed"]

_PLAIN = frozenset({"host", "port", "db", "username", "password"})
_MAX_BUFFER = 64 * 1024 * 1024  # of replies not yet whole (hiredis's own bound is larger)
_MAX_UNSENT = 8 * 1024 * 1024  # of commands Redis has not read: past it, the connection is dropped


def packed(command: Sequence[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (bytes as they are, text in UTF-8, numbers
    as redis-py spells them). Anything else is redis-py's DataError, as it is there."""
    if not command:
        raise DataError("an empty command (Redis would answer nothing, and the next reply shift)")
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise DataError(
                f"a Redis argument must be bytes, text or a number, not {type(arg).__name__}"
            )
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Waiting:
    __slots__ = ("count", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.future = future
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    """The connection: what is sent, and the batches waiting for their replies, in order. Once
    it has failed (lost, out of step, late, or holding too much Redis has not read) it is
    aborted, every batch waiting on it fails, and nothing more is sent on it."""

    def __init__(self, on_lost: Callable[[_Protocol], None]) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.failure: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, count: int, future: asyncio.Future[list[Any]]) -> None:
        if self.failure is not None or self.transport is None:
            raise RedisConnectionError("the connection to Redis was lost")
        self._waiting.append(_Waiting(count, future))
        try:
            self.transport.write(data)
        except BaseException:  # (not sent: its place in the queue would shift every reply)
            failure = RedisConnectionError("a command could not be sent to Redis")
            self.fail(failure)
            raise failure from None
        if self.transport.get_write_buffer_size() > _MAX_UNSENT:
            self.fail(RedisConnectionError("Redis is not reading what is sent to it"))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                waiting = self._waiting[0] if self._waiting else None
                if waiting is None:
                    raise RedisConnectionError("Redis answered a command nobody sent")
                if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                    reply = NoScriptError(str(reply))
                waiting.replies.append(reply)
                if len(waiting.replies) == waiting.count:
                    self._waiting.popleft()
                    if not waiting.future.done():
                        waiting.future.set_result(waiting.replies)
            if reader.len() > _MAX_BUFFER:
                raise RedisConnectionError("a Redis reply over the bound")
        except (hiredis.ProtocolError, RedisConnectionError) as exc:
            self.fail(exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError("the connection to Redis was lost"))

    def fail(self, failure: BaseException) -> None:
        """Every batch still waiting fails with `failure`, and the connection is aborted (what
        Redis has not read yet is dropped, not run late)."""
        if self.failure is None:
            self.failure = failure
            self._on_lost(self)
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(failure)
        if self.transport is not None:
            self.transport.abort()


class Pipe:
    """Batches of commands on one connection, pipelined (see the module's docstring). A caller
    waits `timeout` at most, for a new connection (greeted) and its replies together."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        hello: list[list[Any]] = []  # what a new connection is told first
        if username or password is not None:  # (as redis-py: a user with no password too)
            hello.append(["AUTH", username, password or ""] if username else ["AUTH", password])
        if db:
            hello.append(["SELECT", db])
        self._greeting = b"".join(packed(c) for c in hello)
        self._greeted = len(hello)  # replies the greeting has
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    @classmethod
    def for_url(cls, url: str, *, timeout: float) -> Pipe | None:
        """The pipe for a plain `redis://` URL; None for any other."""
        if not url.startswith("redis://"):
            return None
        options = parse_url(url)
        if not set(options) <= _PLAIN:
            return None
        return cls(
            options.get("host", "localhost"),
            int(options.get("port", 6379)),
            db=int(options.get("db", 0) or 0),
            username=options.get("username"),
            password=options.get("password"),
            timeout=timeout,
        )

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies of `commands`, sent together, in order (an error reply is its exception,
        in its place), within the timeout, a new connection's making included. Raises redis-py's
        ConnectionError or TimeoutError when the connection fails or the replies do not all come
        in time; the commands may then have run. A caller that gives up leaves its place in the
        queue (its replies still come, and go nowhere): the connection is dropped only when a
        batch has had no whole reply for a timeout since it was sent."""
        if not commands:
            return []
        data = b"".join(packed(c) for c in commands)  # (a bad argument raises before anything)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        conn = self._conn
        waited = conn is None  # (part of this caller's time goes on the connection's making)
        if conn is None:
            conn = await self._connect(deadline)
        future: asyncio.Future[list[Any]] = loop.create_future()
        conn.send(data, len(commands), future)
        timer = loop.call_at(deadline, self._late, conn, future, not waited)
        try:
            return await future
        finally:
            timer.cancel()

    def _late(self, conn: _Protocol, future: asyncio.Future[list[Any]], whole: bool) -> None:
        """The caller's time is up. If it was all spent waiting for this batch's replies (`whole`:
        sent at once, on a connection already made), the connection is stuck: made again."""
        if future.done():
            return
        future.set_exception(RedisTimeoutError("Timeout reading from Redis"))
        if whole:
            conn.fail(RedisTimeoutError("Timeout reading from Redis"))

    async def _connect(self, deadline: float) -> _Protocol:
        """The connection, made (and greeted) once for all who wait for it; this caller waits
        until its `deadline` at most."""
        if self._closed:
            raise RedisConnectionError("the limiter is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(self._connecting)
        except TimeoutError:
            raise RedisTimeoutError("Timeout connecting to Redis") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise RedisConnectionError("the limiter is closed") from None  # (not ours)
            raise

    def _connected(self, opening: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if opening.cancelled() or opening.exception() is not None:
            return
        conn = opening.result()
        if self._closed:
            conn.fail(RedisConnectionError("the limiter is closed"))
        elif conn.failure is None:  # (not one that died as it was made)
            self._conn = conn

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        conn: _Protocol | None = None
        try:
            async with asyncio.timeout(self._timeout):
                _, conn = await loop.create_connection(
                    lambda: _Protocol(self._lost), self._host, self._port
                )
                if self._greeted:
                    future: asyncio.Future[list[Any]] = loop.create_future()
                    conn.send(self._greeting, self._greeted, future)
                    refused = [r for r in await future if isinstance(r, Exception)]
                    if refused:
                        raise RedisConnectionError(f"Redis refused the connection: {refused[0]}")
            if conn.failure is not None:  # (it said something unasked, or hung up, meanwhile)
                raise conn.failure
            return conn
        except BaseException as exc:
            if conn is not None:
                conn.fail(RedisConnectionError("the connection to Redis was not made"))
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("Timeout connecting to Redis") from None
            if isinstance(exc, RedisError):
                raise
            if isinstance(exc, Exception):  # (OSError, or a host name no resolver takes)
                raise RedisConnectionError(f"Cannot connect to Redis: {type(exc).__name__}") from None
            raise

    def _lost(self, conn: _Protocol) -> None:
        if self._conn is conn:
            self._conn = None

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(RedisConnectionError("the limiter is closing"))
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
