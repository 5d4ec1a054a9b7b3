"""The one HTTP transport every HTTP provider adapter shares, and what it knows about failures.

An adapter is a translation: it builds a `Request`, and reads a `Response` (whole, or as SSE
`Event`s) into our types. The transport owns everything else: one pool of kept-alive connections
per provider (`_client`, HTTP/1.1 on httptools), the connect / first-token / idle / total
timeouts, SSE framing (`data:`-only streams and named `event:` ones alike), and the ONE place
where the client's and the OS's exceptions become the error tree (`translate`). Adapters never see
the client, so each can be tested in process against a `MockTransport` whose handler plays the
upstream.

Redirects are not followed: a 3xx would send the prompt wherever it points, so it is a failure of
the deployment (`status_error`).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

import msgspec

from llmrouter.errors import (
    LlmrouterError,
    ProviderError,
    UpstreamAuthFailed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llmrouter.obs import tracing
from llmrouter.providers import _client
from llmrouter.settings import Timeouts

__all__ = [
    "MAX_ERROR_TEXT",
    "Event",
    "EventStream",
    "HttpTransport",
    "MockResponse",
    "MockTransport",
    "Request",
    "Response",
    "Transport",
    "bounded_delay",
    "parse_retry_after",
    "read_whole",
    "status_error",
    "translate",
]

MAX_ERROR_TEXT = 500  # of an upstream's error message, relayed
MAX_ERROR_BODY = 64 * 1024  # read of an error response's body
MAX_SSE_LINE = 64 * 1024 * 1024  # one line of a stream (a long completion in one chunk is long)
_MAX_RETRY_AFTER = 3600.0


class Request(msgspec.Struct, frozen=True):
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = msgspec.field(default_factory=dict)


class Response(Protocol):
    """An upstream's response, its headers in: the body is read with `read` or `chunk`."""

    status: int
    headers: Mapping[str, str]  # case-insensitive

    async def read(self, limit: int | None = None) -> bytes:
        """The body (at most `limit` bytes), within the attempt's total time."""

    async def chunk(self, wait: float) -> bytes:
        """The next piece of the body, waiting at most `wait` seconds; b"" at its end."""

    def release(self) -> None:
        """Give the connection back (or drop it, if the body was not read)."""

    def finish(self) -> bool:
        """If the body's end has already arrived: give the connection back, whatever of the body
        is unread dropped (True). Otherwise nothing (False)."""


class Transport(Protocol):
    name: str  # the provider's, for messages

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    @property
    def started(self) -> bool: ...

    async def send(self, request: Request, timeouts: Timeouts) -> Response:
        """Send `request` and wait (at most `timeouts.first_token`) for the response's headers."""


# -- translating failures ---------------------------------------------------------------------


def translate(exc: BaseException, provider: str) -> ProviderError:
    """Any exception the network stack raises, as the error tree has it. The message names the
    provider and the exception's class, never its text (which may quote a URL, or a header)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"Provider {provider} did not answer in time.")
    if isinstance(exc, _client.ProtocolError | OSError):
        return UpstreamUnavailable(f"Provider {provider} is unreachable: {type(exc).__name__}.")
    return UpstreamUnavailable(f"Provider {provider} failed: {type(exc).__name__}.")


def status_error(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    detail: str,
    *,
    recognised: type[LlmrouterError] | None = None,
    retry_after: float | None = None,
) -> LlmrouterError:
    """An error status, as the error tree has it. `detail` is the upstream's message (already
    redacted); `recognised` is the class the adapter read the body as (a prompt too long, a
    content refusal), `retry_after` a delay the body gave where the header gives none."""
    detail = detail[:MAX_ERROR_TEXT]
    said = f"Provider {provider} answered {status}" + (f": {detail}" if detail else ".")
    if 300 <= status < 400:
        return UpstreamUnavailable(
            f"Provider {provider} answered {status}, a redirect, which llmrouter does not "
            "follow: set its base_url to where it points."
        )
    wait = parse_retry_after(headers.get("retry-after"))
    wait = bounded_delay(retry_after) if wait is None else wait
    if recognised is not None:
        return recognised(said, retry_after=wait)
    if status in (401, 403):
        return UpstreamAuthFailed(f"Provider {provider} refused llmrouter's credentials ({status}).")
    if status == 429:
        return UpstreamRateLimited(said, retry_after=wait)
    if status in (400, 422):
        return UpstreamRejected(said)
    if status == 408:
        return UpstreamTimeout(said)
    return UpstreamUnavailable(said, retry_after=wait)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date; at most an hour,
    and nothing for a value that is not a finite time."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return bounded_delay(seconds)


def bounded_delay(seconds: float | None) -> float | None:
    """A delay an upstream asked for, as seconds within [0, an hour]; nothing if not finite."""
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)


# -- reading ------------------------------------------------------------------------------------

# A whole answer's body, or the error the response's status is: adapters give their own reading
# of an error body.
ErrorReader = Callable[[Response, bytes], LlmrouterError]


async def read_whole(response: Response, on_error: ErrorReader) -> bytes:
    """The whole body of a 200, or the error its status says (read by `on_error`)."""
    try:
        if response.status != 200:
            raise on_error(response, await error_body(response))
        return await response.read()
    finally:
        response.release()


async def error_body(response: Response) -> bytes:
    try:
        return await response.read(MAX_ERROR_BODY)
    except ProviderError:
        return b""


class Event(msgspec.Struct, frozen=True, gc=False):
    """One server-sent event: its `event:` name ("message" where it has none) and `data:`.
    (A Struct: made for every event of every stream, it costs a third of a frozen dataclass.)"""

    name: str
    data: bytes


class EventStream:
    """The events of an SSE body (`data:`-only streams and named `event:` ones alike), read as they
    come, the events of one read of the body together (an upstream that sends faster than it is
    read gives many at once, and each layer above takes them in one go): the first read within
    `first` seconds, each next one within `idle`. The adapter knows which event is its stream's
    last: it calls `finish()` there, which reads the rest of the body (a short wait) so that the
    connection goes back to the pool. Leaving without `finish()` (an error, an early end) drops
    the connection. Lines are split here, as they come, with no bound but `MAX_SSE_LINE` (a long
    completion in one chunk is one long line)."""

    def __init__(self, response: Response, *, first: float, idle: float, provider: str) -> None:
        self._response = response
        self._wait = first
        self._idle = idle
        self._provider = provider
        self._buffer = bytearray()
        self._scanned = 0  # bytes of `_buffer` known to hold no newline
        self._name = ""
        self._data: list[bytes] = []
        self.finished = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> list[Event]:
        """The events that the next read (or reads, until one ends an event) completes."""
        while True:
            chunk = await self._response.chunk(self._wait)
            if not chunk:
                raise StopAsyncIteration  # the body ended (the adapter says whether too early)
            if events := self._frame(chunk):
                self._wait = self._idle
                return events

    def _frame(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer  # what came after the last whole line (usually nothing)
        if buffer:
            buffer += chunk
            end = buffer.rfind(b"\n", self._scanned)  # the last whole line's end
            whole = bytes(buffer[:end]) if end >= 0 else None
            del buffer[: end + 1]
        else:
            end = chunk.rfind(b"\n")
            whole = chunk[:end] if end >= 0 else None
            if end + 1 < len(chunk):
                buffer += chunk[end + 1 :]
        self._scanned = len(buffer)
        if self._scanned > MAX_SSE_LINE:
            raise UpstreamUnavailable(
                f"Provider {self._provider} sent a stream line over {MAX_SSE_LINE} bytes."
            )
        ready: list[Event] = []
        if whole is None:
            return ready
        lines = whole.split(b"\n")
        if b"\r" in whole:
            lines = [line.rstrip(b"\r") for line in lines]
        data = self._data
        for line in lines:
            if not line:  # the end of an event
                if data:
                    ready.append(Event(self._name or "message", b"\n".join(data)))
                    data.clear()
                self._name = ""
            elif line.startswith(b"data: "):
                data.append(line[6:])
            elif line.startswith(b"data:"):
                data.append(line[5:])
            elif line.startswith(b"event:"):
                self._name = line[6:].strip().decode("utf-8", errors="replace")
            # (comments `:`, `id:` and `retry:` lines say nothing an adapter reads)
        return ready

    def finish(self) -> None:
        """After the stream's last event: the rest of the body (its end, usually on its way
        already) is read in the background, for at most `_FINISH_WAIT`, and then the connection
        goes back to the pool; the answer does not wait for it."""
        if self.finished:
            return
        self.finished = True
        if self._response.finish():  # (its end came with the last event, as it usually does)
            return
        task = asyncio.ensure_future(self._drain())
        _DRAINING.add(task)
        task.add_done_callback(_DRAINING.discard)

    async def _drain(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            until = loop.time() + _FINISH_WAIT
            while (left := until - loop.time()) > 0 and await self._response.chunk(left):
                pass
        except ProviderError:
            pass  # what came after the last event does not matter; the connection is dropped
        finally:
            self._response.release()

    def release(self) -> None:
        """Drop the connection (unless `finish` has it)."""
        if not self.finished:
            self._response.release()


_DRAINING: set[asyncio.Future[None]] = set()  # (a task is kept only as long as it is referenced)
_FINISH_WAIT = 1.0  # seconds for a body to end after its stream's last event


# -- the real one -------------------------------------------------------------------------------


class _WireResponse:
    """A `_client` response as `Response`: its reads bounded by the attempt's total time too, and
    their failures translated."""

    __slots__ = ("_deadline", "_provider", "_response", "headers", "status")

    def __init__(self, response: _client.ClientResponse, provider: str, deadline: float) -> None:
        self._response = response
        self._provider = provider
        self._deadline = deadline
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self, limit: int | None = None) -> bytes:
        try:
            return await self._response.read(self._deadline, limit)
        except Exception as exc:
            raise translate(exc, self._provider) from None

    async def chunk(self, wait: float) -> bytes:
        try:
            deadline = min(self._deadline, asyncio.get_running_loop().time() + wait)
            return await self._response.chunk(deadline)
        except Exception as exc:
            raise translate(exc, self._provider) from None

    def release(self) -> None:
        self._response.release()

    def finish(self) -> bool:
        return self._response.finish()


class HttpTransport:
    """One pool of kept-alive connections (`_client`): up to `max_connections`. Each `send` is
    bounded by its call's timeouts: `total` an attempt (its response's reads too), `connect` a new
    connection's connect, `first_token` the wait for the response's head."""

    def __init__(self, name: str, *, max_connections: int) -> None:
        self.name = name
        self._max_connections = max_connections
        self._pool: _client.Pool | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    async def start(self) -> None:
        self._pool = _client.Pool(limit=self._max_connections, keepalive=_KEEPALIVE)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None  # not started any more, as MockTransport
        if pool is not None:
            await pool.aclose()

    async def send(self, request: Request, timeouts: Timeouts) -> Response:
        assert self._pool is not None, "start() opens the pool"
        now = asyncio.get_running_loop().time()
        deadline = now + timeouts.total
        try:
            response = await self._pool.request(
                request.method,
                request.url,
                tracing.inject(request.headers) if tracing.enabled() else request.headers,
                request.body,
                connect=timeouts.connect,
                deadline=min(deadline, now + timeouts.first_token),
            )
        except Exception as exc:
            raise translate(exc, self.name) from None
        return _WireResponse(response, self.name, deadline)


_KEEPALIVE = 60.0  # seconds an idle upstream connection is kept


# -- the one for tests --------------------------------------------------------------------------


class MockResponse:
    """A response played by a test: a status, headers, and the body as pieces; a piece that is an
    exception is raised where it would arrive (translated, as the real transport does), and a
    piece that is a float is a pause of that many seconds."""

    def __init__(
        self,
        status: int = 200,
        body: bytes | Iterable[bytes | float | BaseException] = b"",
        headers: Mapping[str, str] | None = None,
        *,
        provider: str = "mock",
    ) -> None:
        self.status = status
        self.headers: Mapping[str, str] = _client.Headers(headers)
        self._pieces = [body] if isinstance(body, bytes) else list(body)
        self._provider = provider
        self.released = False

    async def read(self, limit: int | None = None) -> bytes:
        body = b""
        while piece := await self.chunk(math.inf):
            body += piece
        return body if limit is None else body[:limit]

    async def chunk(self, wait: float) -> bytes:
        while self._pieces:
            piece = self._pieces.pop(0)
            if isinstance(piece, float):
                if piece > wait:
                    await asyncio.sleep(wait)
                    raise translate(TimeoutError(), self._provider)
                await asyncio.sleep(piece)
                continue
            if isinstance(piece, BaseException):
                raise translate(piece, self._provider)
            return piece
        return b""

    def release(self) -> None:
        self.released = True

    def finish(self) -> bool:
        if any(not isinstance(piece, float) for piece in self._pieces):
            return False  # (more to come, or a failure: read on, as the real one does)
        self.released = True
        return True


class MockTransport:
    """A transport whose upstream is `handler`: it gets each `Request` and returns the
    `MockResponse` (or raises what the network would, translated here as the real one does)."""

    def __init__(
        self, handler: Callable[[Request], Awaitable[MockResponse]], name: str = "mock"
    ) -> None:
        self.name = name
        self._handler = handler
        self.requests: list[Request] = []
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    async def start(self) -> None:
        self._started = True

    async def aclose(self) -> None:
        self._started = False

    async def send(self, request: Request, timeouts: Timeouts) -> Response:
        self.requests.append(request)
        try:
            async with asyncio.timeout(timeouts.first_token):
                return await self._handler(request)
        except Exception as exc:
            raise translate(exc, self.name) from None
