"""A pooled HTTP/1.1 client on asyncio's protocols and httptools' parser: what the upstream hop
needs and nothing more.

A router's upstream call is one POST of a JSON body to a handful of hosts, answered whole or as
a stream; aiohttp, built for everything a client may do (cookies, redirects, proxies, multipart,
its own payload registry, a request object of forty fields), spent four to five times this
module's CPU on it (60 µs an exchange against 11 at 16 at once, `bench/README.md`). Here a
request is one `write` of its head and body on a kept-alive connection, and its response is
parsed by httptools (llhttp, uvicorn's parser at the edge) as it arrives; a body small enough to
come with its head is whole before anyone waits for it.

What it does: keep-alive connections pooled by origin (at most `limit` in all, LIFO, idle ones
closed after `keepalive` seconds or when the peer closes them), `https` through the default SSL
context (the system's CAs, `SSL_CERT_FILE` honoured), bodies framed by Content-Length, chunked
transfer-encoding or the connection's end, gzip and deflate answers decoded (none is asked for:
no `accept-encoding` is sent, so an upstream answers in identity), reading paused while more than
`_HIGH_WATER` bytes wait to be read. What it does not: redirects (a 3xx is an answer), proxies,
cookies, `HEAD`, upgrades, and retries: a request is sent once, and a connection that fails is
the attempt's failure, whatever the reason (an upstream closing an idle connection as it was
reused among them), for the executor, the one owner of retries, to count and decide on.

Its failures are the standard library's (`OSError`, `TimeoutError`, `ssl.SSLError`) and its own
`ProtocolError`; the transport above it (`_http`) translates them, once, into the error tree.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import select
import ssl
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["ClientResponse", "Headers", "Pool", "ProtocolError"]

_HIGH_WATER = 256 * 1024  # bytes of a body received and not yet read: reading pauses above
_MAX_HEAD = 128 * 1024  # bytes of an answer's head (its status line and fields)
_MAX_FIELDS = 256  # header fields of an answer's head
_MAX_DECODED = 64 * 1024 * 1024  # bytes a compressed body may decode to, read whole
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})  # ours to write
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a field name (RFC 9110, 5.6.2)
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a field value: visible text, spaces, tabs
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")


class ProtocolError(Exception):
    """The peer broke HTTP/1.1: an answer that does not parse, a body cut short, a connection
    closed before any answer."""


class Headers(dict[str, str]):
    """A response's headers, looked up in any letter case (the names are kept lower-cased; a
    repeated header's values are joined with ", ", as RFC 9110 allows)."""

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        super().__init__({k.lower(): v for k, v in (headers or {}).items()})

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class _Origin:
    """Where a URL's requests go, and the start of their heads (parsed once per URL)."""

    __slots__ = ("authority", "host", "key", "method", "port", "ssl", "target")

    def __init__(self, method: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("a URL with credentials in it: give them as headers (or api_key)")
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.key = (self.ssl, self.host, self.port)
        default_port = parts.port is None or parts.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if default_port else f"{host}:{self.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if _BAD_TARGET.search(target) or _BAD_TARGET.search(authority):
            raise ValueError("a URL with a space or a control character in its path or host")
        self.method = method
        self.authority = authority
        self.target = target


@functools.lru_cache(maxsize=512)
def _origin(method: str, url: str) -> _Origin:
    return _Origin(method, url)


def _head(origin: _Origin, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """The request's head: a `host` field (the URL's, unless the headers give one), the headers
    (each name a token, each value free of control characters), and the body's length."""
    host = origin.authority
    lines = []
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(f"a request header that is not a valid field: {name[:40]!r}")
        lower = name.lower()
        if lower == "host":
            host = value
        elif lower not in _FRAMING:
            lines.append(f"{name}: {value}\r\n")
    if body is not None or origin.method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body or b'')}\r\n")
    start = f"{origin.method} {origin.target} HTTP/1.1\r\nhost: {host}\r\n"
    return (start + "".join(lines) + "\r\n").encode("latin-1")


class ClientResponse:
    """A response whose head has come: `status`, `headers`, and the body read with `read` or
    `chunk`. `release` gives the connection back (if the body was read to its end) or closes it."""

    __slots__ = (
        "_conn", "_decoder", "_done", "_error", "_high", "_pieces", "_size", "_waiter", "headers",
        "status",
    )  # fmt: skip

    def __init__(self, conn: _Connection, status: int, headers: Headers) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._pieces: list[bytes] = []  # received, not yet read (still compressed, if it is)
        self._size = 0
        self._high = _HIGH_WATER  # reading pauses with more than this waiting
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        encoding = headers.get("content-encoding", "").strip().lower()
        self._decoder: _Decoder | None = None
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = _Decoder()
        elif encoding not in ("", "identity"):
            self._error = ProtocolError(f"an answer in an encoding not asked for: {encoding[:40]}")

    # -- from the connection --------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._error is not None:
            return  # (an answer in an encoding not asked for: none of it is read)
        self._pieces.append(data)
        self._size += len(data)
        if self._size > self._high and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _end(self, error: BaseException | None = None) -> None:
        if not self._done:
            self._done = True
            self._error = self._error or error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- to the reader --------------------------------------------------------------------------

    async def _wait(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _take(self, limit: int | None = None) -> bytes:
        """What has arrived (at most `limit` bytes of it, decoded), taken off the queue."""
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        decoder = self._decoder
        if decoder is not None:
            out = decoder.decode(data, limit if limit is not None else _HIGH_WATER)
            pieces[:] = [decoder.tail] if decoder.tail else []
            self._size = len(decoder.tail)
            if self._done and not pieces and self._error is None:
                out += decoder.end()  # (raises for a compressed body cut short)
        else:
            if limit is not None and len(data) > limit:
                pieces[:] = [data[limit:]]
                data = data[:limit]
            else:
                pieces.clear()
            self._size -= len(data)
            out = data
        if self._conn is not None and self._size <= self._high:
            self._conn.resume()
        return out

    async def read(self, deadline: float, limit: int | None = None) -> bytes:
        """The body, whole (or its first `limit` bytes), by `deadline` (the loop's clock)."""
        try:
            if limit is None:
                self._high = _MAX_DECODED  # the whole is wanted: no pause (up to a bound)
                body = bytearray()
                while not self._done or self._pieces:
                    if self._error is not None:
                        raise self._error
                    if not self._pieces:
                        await self._wait(deadline)
                        continue
                    body += self._take()
                    if len(body) > _MAX_DECODED:
                        raise ProtocolError(f"an answer over {_MAX_DECODED} bytes")
                if self._error is not None:
                    raise self._error
                if self._decoder is not None:
                    body += self._decoder.end()
                return bytes(body)
            self._high = max(self._high, limit)
            got = bytearray()
            while len(got) < limit:
                if self._error is not None and not self._pieces:
                    raise self._error
                if self._pieces:
                    got += self._take(limit - len(got))
                elif self._done:
                    break
                else:
                    await self._wait(deadline)
            return bytes(got)
        except zlib.error:
            raise self._broken() from None

    async def chunk(self, deadline: float) -> bytes:
        """What has arrived of the body since the last read (at most `_HIGH_WATER` bytes of it
        decoded; waiting for something, by `deadline`); b"" at its end."""
        try:
            while True:
                if self._error is not None and (not self._pieces or self._decoder is not None):
                    raise self._error  # (an undecodable body: nothing of it goes on)
                if self._pieces:
                    if data := self._take():
                        return data
                elif self._done:
                    return self._decoder.end() if self._decoder is not None else b""
                else:
                    await self._wait(deadline)
        except zlib.error:
            raise self._broken() from None

    def _broken(self) -> ProtocolError:
        self._error = ProtocolError("a compressed answer that does not decompress")
        return self._error

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(keep=self._done and self._error is None and not self._pieces)

    def finish(self) -> bool:
        """If the body has all arrived, whole: give the connection back now, whatever of the body
        is still unread dropped (True). Otherwise nothing (False)."""
        if not self._done or self._error is not None:
            return False
        self._pieces.clear()
        self._size = 0
        self.release()
        return True


class _Decoder:
    """gzip or zlib-wrapped deflate (told apart by their headers), decoded a bounded amount at a
    time: what is left to decode waits in `tail`."""

    __slots__ = ("_zlib", "ended", "tail")

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 32)
        self.tail = b""
        self.ended = False

    def decode(self, data: bytes, most: int) -> bytes:
        out = self._zlib.decompress(data, most)
        self.tail = self._zlib.unconsumed_tail
        return out

    def end(self) -> bytes:
        """At the body's end: what is left (once), or a failure if the stream is cut short."""
        if self.ended:
            return b""
        self.ended = True
        out = self._zlib.flush()
        if not self._zlib.eof:
            raise zlib.error("the compressed body ends before its end")
        return out


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One kept-alive connection: its parser, and the response it is reading (one at a time)."""

    def __init__(self, pool: Pool, key: tuple[bool, str, int]) -> None:
        self._pool = pool
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._fd = -1  # the socket's, for the check before reuse
        self.closed = False  # closed, or closing
        self.idle_since = 0.0
        self._paused = False
        self._head: asyncio.Future[ClientResponse] | None = None
        self._response: ClientResponse | None = None
        self._fields: dict[str, list[str]] = {}
        self._head_bytes = 0
        self._field_count = 0
        self._expecting = False  # a request is sent and its answer's head not yet parsed
        self._stray = False  # an answer came that no request asked for
        self._keep_alive = False  # the answer's version and `connection` header allow another
        self._framed = False  # its body's end is marked (a length or chunks), not the close
        self._eof = False  # the peer ended its side (a body framed by the close ends there)

    # -- asyncio ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._response is None:
            self.close()  # an idle connection has nothing to say; a stray answer ends it
            return
        try:
            self._parser.feed_data(data)
            if self._stray:
                self._fail(ProtocolError("an answer no request asked for"))
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the upstream switched protocols"))
        except httptools.HttpParserCallbackError as exc:  # (raised by a callback: a bound)
            self._fail(
                exc.__context__
                if isinstance(exc.__context__, ProtocolError)
                else ProtocolError(str(exc))
            )
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"an answer that is not HTTP/1.1 ({type(exc).__name__})"))

    def eof_received(self) -> bool:
        self._eof = True
        return False  # (the transport closes; connection_lost says what that ends)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response._done:
            if self._framed or exc is not None or not self._eof:
                # cut short: inside a framed body, by a reset, or by our own close
                response._end(ProtocolError("the connection closed inside the answer's body"))
            else:
                response._end()  # a body that ends with the connection: this is its end
        elif self._head is not None and not self._head.done():
            if exc is None:
                exc = ProtocolError("the connection closed before an answer")
            self._head.set_exception(exc)
        self._pool._lost(self)

    # -- httptools ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._fields = {}
        self._head_bytes = 0
        self._field_count = 0
        self._stray = not self._expecting

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        self._field_count += 1
        if self._head_bytes > _MAX_HEAD or self._field_count > _MAX_FIELDS:
            raise ProtocolError(f"an answer's head over {_MAX_HEAD} bytes or {_MAX_FIELDS} fields")
        key = name.decode("latin-1").lower()
        values = self._fields.get(key)
        if values is None:
            self._fields[key] = [value.decode("latin-1")]
        else:
            values.append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 or self._stray:
            return  # an interim answer (103 Early Hints): the real one follows
        self._expecting = False
        self._keep_alive = self._parser.should_keep_alive()  # (llhttp forgets it at the end)
        headers = Headers.__new__(Headers)  # (the names are lower-cased already)
        for key, values in self._fields.items():
            dict.__setitem__(headers, key, values[0] if len(values) == 1 else ", ".join(values))
        self._framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "")
        response = self._response = ClientResponse(self, status, headers)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._stray:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and not self._stray:
            response._end()

    # -- the pool's -----------------------------------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future[ClientResponse]:
        assert self._transport is not None and self._response is None
        self._head = asyncio.get_running_loop().create_future()
        self._expecting = True
        self._transport.write(data)
        return self._head

    def finished(self, *, keep: bool) -> None:
        """The response is done with: the connection goes back to the pool, or is closed. Not
        kept: one the answer ended before the request was all written (an early 413, say: the
        rest of that body would go out ahead of the next request)."""
        self._response = None
        transport = self._transport
        if (
            keep
            and self._keep_alive
            and not self.closed
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        ):
            self.resume()
            self._pool._idle(self)
        else:
            self.close()

    def usable(self) -> bool:
        """Before reuse: neither closed nor closing, and with nothing to read (an idle
        connection that is readable has been closed by the peer, or says something no request
        asked for; either way it is done, as urllib3 judges a pooled connection)."""
        if self.closed or self._transport is None or self._transport.is_closing():
            return False
        if self._fd >= 0:
            try:
                readable, _, _ = select.select([self._fd], [], [], 0)
            except (OSError, ValueError):
                return False
            if readable:
                self.close()
                return False
        return True

    def pause(self) -> None:
        if not self._paused and self._transport is not None and not self.closed:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def _fail(self, error: BaseException) -> None:
        response = self._response
        if response is not None:
            response._end(error)
        elif self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()  # (connection_lost follows, and tells the pool)


class Pool:
    """Connections kept alive by origin: at most `limit` open in all; an idle one is closed after
    `keepalive` seconds."""

    def __init__(self, *, limit: int, keepalive: float = 60.0) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._idle_by: dict[tuple[bool, str, int], list[_Connection]] = collections.defaultdict(list)
        self._open: set[_Connection] = set()
        self._opening = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        connect: float,
        deadline: float,
    ) -> ClientResponse:
        """Send a request; its response once its head has come, by `deadline` (the loop's clock);
        `connect` seconds at most for a new connection."""
        if self._closed:
            raise ProtocolError("the client is closed")
        origin = _origin(method, url)
        data = _head(origin, headers, body)
        if body:
            data += body
        conn = self._take(origin.key) or await self._connect(origin, connect, deadline)
        try:
            response: ClientResponse = await _within(conn.send(data), deadline)
        except BaseException:
            conn.close()  # (an answer may still come: the connection cannot be reused)
            raise
        return response

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        if self._sweep is not None:
            self._sweep.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ProtocolError("the client closed"))

    # -- connections ----------------------------------------------------------------------------

    def _take(self, key: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle_by.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    async def _connect(self, origin: _Origin, connect: float, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        first = True
        while len(self._open) + self._opening >= self._limit:
            if self._close_an_idle():
                continue
            waiter = loop.create_future()
            if first:
                self._waiters.append(waiter)
            else:
                self._waiters.appendleft(waiter)  # (woken and outrun: first in line again)
            first = False
            try:
                await _within(waiter, deadline)
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # woken, but gone: the turn is the next one's
                raise
            if (conn := self._take(origin.key)) is not None:
                return conn
        self._opening += 1
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + connect)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin.key),
                    origin.host,
                    origin.port,
                    ssl=self._context() if origin.ssl else None,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except BaseException:
            self._wake_one()  # the slot it would have taken is free again
            raise
        finally:
            self._opening -= 1
        if self._closed:
            conn.close()
            raise ProtocolError("the client is closed")
        self._open.add(conn)
        return conn

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _close_an_idle(self) -> bool:
        for idle in self._idle_by.values():
            while idle:
                conn = idle.pop(0)  # the longest idle
                if not conn.closed:
                    conn.close()
                    self._open.discard(conn)
                    return True
        return False

    def _idle(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle_by[conn.key].append(conn)
        self._wake_one()
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._expire_idle)

    def _lost(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire_idle(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._keepalive
        left = False
        for idle in self._idle_by.values():
            for conn in [c for c in idle if c.idle_since <= oldest or c.closed]:
                idle.remove(conn)
                conn.close()
            left = left or bool(idle)
        if left:
            self._sweep = loop.call_later(self._keepalive / 2, self._expire_idle)


async def _within(future: asyncio.Future[Any], deadline: float) -> Any:
    """`await future`, or TimeoutError at `deadline` (a timer on the loop, no task of its own)."""
    if not future.done():
        timer = asyncio.get_running_loop().call_at(deadline, _expire, future)
        try:
            await future
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            timer.cancel()
    return future.result()
