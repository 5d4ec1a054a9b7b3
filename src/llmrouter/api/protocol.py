"""The HTTP/1.1 connection: uvicorn's httptools protocol, with the bounds a public edge needs.

uvicorn reads a request's line and headers whole, however large (httptools grows its buffers as
they come, so a 100 MB header costs seconds and gigabytes), waits for ever for a client that sends
one byte a second or nothing at all, and answers a malformed request in plain text. This protocol
keeps uvicorn's request cycle and adds, per connection:

- a size bound on the request line and headers together (`server.max_header_bytes`): past it,
  414 if the request line is not over yet, else 431, and the connection is closed; the same bound
  holds a chunked body's framing and trailers (which httptools parses as headers);
- four deadlines (`server.client_timeouts`): `idle` for a connection with no request under way
  (before its first byte, and between requests), `headers` from a request's first byte to the end
  of its headers, `body` from there to the end of its body, `write` for a response the client
  does not read (the socket's buffer full). Past one, the connection is closed, after a 408 when
  nothing of a response has been sent;
- errors in the spec's shape, for what the parser refuses too.

The bytes of a request's head are counted as they arrive, before httptools sees them, and fed to
it at most up to the bound, and a body of known length is fed exactly: no more than the bound is
ever parsed for one head, and at most twice it for a head pipelined right behind another request
(the bytes of a piece in which one head or body ends and the next part begins are not counted,
since where the next begins is not known). A deadline is one timer handle
per connection, re-armed as the request moves from head to body; the common path pays a length
check and two timer calls per request.

Writes go through a `_Coalescing` transport, which saves system calls and never delays a byte
the client is waiting for: a response's head is held until its first body part (one `write` for
both), and the parts a handler writes in one go (a burst of stream events that arrived together)
are written together at the end of the event loop's turn; the first part of a burst, and so a
stream's first token, goes at once.

With pipelined requests, uvicorn answers them in order while it has parsed ahead: `self.cycle` is
the last one parsed, `self.running` the one being answered. A refusal that is not the running
request's own (a later request's bad head, say) cannot be answered in order, so it only closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from llmrouter.api.http import ON_DISCONNECT, REFUSED_BY_EDGE
from llmrouter.errors import (
    HeadersTooLarge,
    InvalidRequest,
    LlmrouterError,
    RequestTimeout,
    UriTooLong,
)
from llmrouter.obs.logging import access_log
from llmrouter.settings import ServerSettings
from llmrouter.wire.completions import encoder

__all__ = ["EdgeProtocol"]

_LINGER_SECONDS = 1.0
# The most of a body answered early that is read and dropped to keep the connection (more is
# not waited for: the connection ends).
_DRAIN_BYTES = 64 * 1024
# What a chunk's own line and CRLF may take before the rest counts as framing to bound (a chunk
# size in hex, its CRLFs, a short extension).
_CHUNK_FRAMING = 64


class EdgeProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, server: ServerSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head = server.max_header_bytes
        timeouts = server.client_timeouts
        # uvicorn's timer between requests is our idle one (uvicorn types it int; a float works).
        self.timeout_keep_alive = timeouts.idle  # type: ignore[assignment]
        self.head_seconds = timeouts.headers
        self.body_seconds = timeouts.body
        self.write_seconds = timeouts.write
        self.log_refusals = server.access_log
        self.url = b""
        self.head_bytes = 0  # of the request whose head is being read
        self.in_head = True  # waiting for, or reading, a request line and headers (else a body)
        self.chunked = False  # that body comes in chunks
        self.length: int | None = 0  # or is this long
        self.body_got = self.chunks = 0  # its content so far, its chunks so far
        self.framing = 0  # bytes of the chunked body's framing and trailers beyond their allowance
        self.head_begun = False  # a next request's head has begun (some of its bytes are parsed)
        # Heads and requests ended: a count, to tell a piece of a read in which the head or the body
        # ended (and the next part began, where is not known) from one wholly of one part.
        self.boundaries = 0
        self.running: RequestResponseCycle | None = None  # the request being answered
        self.refused = False  # answered with an error: what else comes is read and dropped
        self.held: LlmrouterError | None = None  # a refusal waiting for the answers before it
        self.deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None
        self.closing: RequestResponseCycle | None = None  # its answer said the connection ends

    # -- the connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every write of this connection (the protocol's and its requests') goes through one
        # coalescer, so they stay in order. (uvicorn's flow control keeps the real transport.)
        self.transport = _Coalescing(transport, self.loop)  # type: ignore[assignment]
        # uvicorn arms its keep-alive timer only after a response; a connection that never sends a
        # byte would be kept for ever.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
        super().connection_lost(exc)
        for cycle in (self.running, self.cycle):  # (the one answered, the one parsed last)
            if cycle is not None and not cycle.response_complete:
                _left(cycle)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._unset_keepalive_if_required()
        self._read(memoryview(data))
        # A deadline for what this read left unfinished (most requests come whole in one read and
        # need none): a head's from the read that began it, a body's from the end of its head.
        if self.deadline is None and not self.refused and not self.transport.is_closing():
            if self.in_head:
                if (self.head_bytes or self.head_begun) and self._idle_cycle():
                    self.deadline = self.loop.call_later(self.head_seconds, self._head_timed_out)
            elif self.running is self.cycle:  # (a pipelined body's time starts when it does)
                self.deadline = self.loop.call_later(self.body_seconds, self._body_timed_out)

    def _read(self, view: memoryview) -> None:
        """Feed a read to the parser, counting the head (and a chunked body's framing)."""
        while view:
            if self.in_head:
                step = self.max_head - self.head_bytes
            elif self.chunked:
                step = self.max_head
            elif self.length is not None:  # the body's rest, exactly: what follows is a next head
                step = max(1, self.length - self.body_got)
            else:  # a length the parser will refuse
                step = len(view)
            piece, view = view[:step], view[step:]
            boundaries, got, chunks = self.boundaries, self.body_got, self.chunks
            self._feed(piece)
            if self.refused or self.transport.is_closing():
                return
            if self.boundaries != boundaries:
                continue  # where in the piece the next part began is not known: not counted
            if self.in_head:
                self.head_bytes += len(piece)
                if self.head_bytes >= self.max_head:
                    self._refuse_head()
                    return
            elif self.chunked:
                # What of the piece was not content, beyond a chunk line's allowance; what a piece
                # of small chunks leaves unused is not kept for later (for trailers, say).
                spent = len(piece) - (self.body_got - got) - _CHUNK_FRAMING * (self.chunks - chunks)
                self.framing = max(0, self.framing + spent)
                if self.framing > self.max_head:
                    message = (
                        "The chunked body's framing and trailers are larger than the limit of "
                        f"{self.max_head} bytes."
                    )
                    self._refuse(HeadersTooLarge(message, param="headers"))
                    return

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No WebSocket here (`ws="none"`): the request goes on as a plain one, as in uvicorn.
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            self._refuse(InvalidRequest(f"Invalid HTTP request: {exc}.", code="invalid_http"))

    def send_400_response(self, msg: str) -> None:
        """What uvicorn sends for a request it cannot parse, in the spec's shape."""
        self._refuse(InvalidRequest(msg, code="invalid_http"))

    def pause_writing(self) -> None:
        """The client is not reading the response as fast as it is written: it has `write`
        seconds to take some of it before the connection is dropped."""
        super().pause_writing()
        if self.write_deadline is None:
            self.write_deadline = self.loop.call_later(self.write_seconds, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None

    # -- a request's progress ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.boundaries += 1
        self.in_head = False
        chunked, length = False, None
        for name, value in self.headers:
            if name == b"content-length":
                length = int(value) if length is None and value.isdigit() else -1
            elif name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
        self.chunked, self.length = chunked, (None if length == -1 else length or 0)
        self.framing = self.body_got = self.chunks = 0
        self.head_begun = False
        self._disarm()  # the body's deadline, if the read leaves it unfinished: data_received
        super().on_headers_complete()
        if self._unwanted_rest(self.length) and self.cycle is not None:
            # A body whose rest would not be read after an early answer: that answer must say the
            # connection ends (only such requests pay for the wrapper).
            self.cycle.send = self._saying_close(self.cycle, self.cycle.send)  # type: ignore[method-assign]

    def _unwanted_rest(self, rest: int | None) -> bool:
        """Whether the rest of the current request's body (`rest` bytes, None: not known) is not
        read after an early answer: more than a drain, unknown, or one the client was told not
        to send (`Expect: 100-continue` answered with a final status)."""
        return self.chunked or rest is None or rest > _DRAIN_BYTES or self.expect_100_continue

    def _saying_close(self, cycle: RequestResponseCycle, send: Any) -> Any:
        async def send_saying_close(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body and self.cycle is cycle:
                rest = None if self.length is None else self.length - self.body_got
                if self._unwanted_rest(rest):
                    self.closing = cycle
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
                    await send(message)
                    cycle.keep_alive = True  # (the connection is ended by `_end_quietly`, lingering)
                    return
            await send(message)

        return send_saying_close

    def on_message_begin(self) -> None:
        self.head_begun = True
        self._unset_keepalive_if_required()  # (armed after a drained body, in the same read)
        super().on_message_begin()
        self.scope[ON_DISCONNECT] = None  # type: ignore[literal-required]

    def on_body(self, body: bytes) -> None:
        self.body_got += len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_message_complete(self) -> None:
        self.boundaries += 1
        self._disarm()
        self.in_head = True
        self.head_bytes = 0
        super().on_message_complete()
        cycle = self.cycle
        if cycle.response_complete and self.running is cycle and not self.pipeline:
            # The rest of a body answered early, dropped: the connection is idle from now.
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        if not self.refused and self.running is self.cycle:
            # uvicorn stops reading past 64 KiB of body until the app asks for more; the body
            # is whole now, and a client that leaves must still be heard (`ON_DISCONNECT`).
            # (A pipelined request's body waits: uvicorn bounds what it parses ahead.)
            self.flow.resume_reading()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self.running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        closing = self.closing
        if closing is not None and closing.response_complete:
            # Its answer said the connection ends: what was pipelined behind it is not run (its
            # client, told so, may send it again elsewhere), and the connection ends quietly.
            self.closing = None
            for cycle, _ in list(self.pipeline):
                self._drop(cycle)
            super().on_response_complete()
            if not self.transport.is_closing():
                self._end_quietly()
            return
        super().on_response_complete()  # starts the next pipelined request, if one is waiting
        if self.transport.is_closing():
            return
        if self.held is not None:
            running = self.running
            if not self.pipeline and (running is None or running.response_complete):
                self._answer(self.held)  # every request before the refused one is answered
            return
        if self.refused:
            return
        if not self.in_head and not self.pipeline and self.running is self.cycle:
            if self.cycle.response_complete:
                rest = None if self.chunked or self.length is None else self.length - self.body_got
                if rest is None or rest > _DRAIN_BYTES or self.expect_100_continue:
                    # Answered before a large body came whole (a 413): the rest is not wanted.
                    # Nor is it waited for when the client asked to be told to send it: one told
                    # a final status sends none, and its next request would be read as the body.
                    self._end_quietly()
                elif self.deadline is None:
                    # Answered before a small body came (a 401 to a head the client wrote on its
                    # own): the rest is read and dropped within the body's deadline, and the
                    # connection goes on. Closing it had ended a connection the response did not
                    # say would end, and the client's next request on it failed.
                    self.deadline = self.loop.call_later(self.body_seconds, self._body_timed_out)
            elif self.deadline is None:  # a pipelined request, started now, its body to come
                self.deadline = self.loop.call_later(self.body_seconds, self._body_timed_out)
        elif self.in_head and self.head_begun and self.deadline is None and self._idle_cycle():
            # The next head began while this response was being sent: its time starts now, and
            # its deadline, not the idle one, governs the connection.
            self._unset_keepalive_if_required()
            self.deadline = self.loop.call_later(self.head_seconds, self._head_timed_out)

    def _idle_cycle(self) -> bool:
        """No response is under way, so a request's head is what the connection waits for."""
        return self.cycle is None or self.cycle.response_complete

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _linger(self) -> None:
        """Close after a refusal the way that lets the client read it: closing a socket with the
        client's bytes still unread sends a reset, which can destroy the response in flight. So end
        our side, drop what the client still sends for up to a second, then close."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.deadline = self.loop.call_later(_LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _end_quietly(self) -> None:
        self.refused = True
        self._disarm()
        self._linger()

    # -- refusals -------------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self.deadline = None
        if self._idle_cycle():
            message = f"The request's headers did not arrive within {self.head_seconds:g} s."
            self._refuse(RequestTimeout(message, param="headers"))
        else:  # the head of a request pipelined behind a response still being sent: not ours to cut
            self.transport.close()

    def _body_timed_out(self) -> None:
        self.deadline = None
        if self.cycle.response_started:  # answered without reading the whole body: nothing to say
            self.transport.close()
            return
        message = f"The request's body did not arrive within {self.body_seconds:g} s."
        self._refuse(RequestTimeout(message, param="body"))

    def _write_timed_out(self) -> None:
        self.write_deadline = None
        self._end_cycles()
        # Even once closing: close() waits for the client to read what is buffered.
        self.transport.abort()

    def _refuse_head(self) -> None:
        limit = f"the limit of {self.max_head} bytes"
        # Still in the request line when nearly all of the head is its URL.
        if len(self.url) + 32 >= self.head_bytes:
            self._refuse(UriTooLong(f"The request line is longer than {limit}.", param="url"))
        else:
            message = f"The request line and headers are larger than {limit}."
            self._refuse(HeadersTooLarge(message, param="headers"))

    def _refuse(self, error: LlmrouterError) -> None:
        """Answer `error` in the spec's shape and close. A request the app is handling is ended
        for it: its receive says the connection refused it (`REFUSED_BY_EDGE`), its sends fall
        silent, and it writes the request's log line. A later request's refusal waits for the
        answers before it; one that cannot be answered in order (the running request's response
        is under way) only closes."""
        if self.transport.is_closing() or self.refused:
            return
        self.refused = True
        self._disarm()
        running = self.running
        if running is not None and running.response_complete:
            running = None
        if running is not None and (self.in_head or running is not self.cycle):
            # A later request's, pipelined: the requests before it are answered first, then the
            # refusal. It never starts, and nothing more is read meanwhile.
            if not self.in_head:
                self._drop(self.cycle)
            self.held = error
            self.flow.pause_reading()
            return
        own = running is not None and running is self.cycle
        if own:
            self.scope[REFUSED_BY_EDGE] = error  # type: ignore[literal-required]
        self._end_cycles()
        if running is not None and (running.response_started or not own):
            self.transport.close()
        else:
            self._answer(error, logged=own)

    def _answer(self, error: LlmrouterError, *, logged: bool = False) -> None:
        """Write a refusal and close; the access log has a line for it, unless the app, whose
        request it ended, writes its own."""
        self.held = None
        self.transport.write(_response(error, self.server_state.default_headers))
        self._linger()
        if self.log_refusals and not logged:
            access_log({"status": error.status, "error": error.code, "message": error.message})

    def _end_cycles(self) -> None:
        """Every request on this connection not yet answered ends: the app's receive says the
        client left, its sends fall silent, and none waiting behind starts."""
        waiting = [cycle for cycle, _ in self.pipeline]
        self.pipeline.clear()
        for cycle in (self.running, self.cycle, *waiting):
            if cycle is not None and not cycle.response_complete:
                self._drop(cycle)

    def _drop(self, cycle: RequestResponseCycle) -> None:
        """One request ends unanswered: its receive says the client left, its sends fall silent,
        it sends no `100 Continue` (after a refusal's end of our side), and it no longer holds
        this protocol (a cycle only the cyclic collector would free, if it never runs)."""
        cycle.waiting_for_100_continue = False
        cycle.on_response = _nothing
        _left(cycle)
        self.pipeline = type(self.pipeline)(entry for entry in self.pipeline if entry[0] is not cycle)


def _left(cycle: RequestResponseCycle) -> None:
    """The client of a request not yet answered has gone: its receive says so, and its handler,
    if it asked (`ON_DISCONNECT`), hears of it now."""
    cycle.disconnected = True
    cycle.message_event.set()
    hook: Callable[[], object] | None = cycle.scope.get(ON_DISCONNECT)  # type: ignore[assignment]
    if hook is not None:
        cycle.scope[ON_DISCONNECT] = None  # type: ignore[literal-required]
        hook()


class _Coalescing:
    """A transport whose writes are coalesced (see the module's docstring); everything else is
    the real transport's. Closing writes what is held first; aborting drops it. After our side
    has ended (`write_eof`), what a handler still writes is dropped, as on a closing transport."""

    __slots__ = ("_ended", "_held", "_loop", "_real", "_scheduled")

    def __init__(self, real: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._real = real
        self._loop = loop
        self._held: list[bytes] = []
        self._scheduled = False  # a flush at the end of this turn (a burst is open)
        self._ended = False

    def write(self, data: bytes) -> None:
        if self._ended:
            return
        held = self._held
        if held and held[0].startswith(b"HTTP/") and not self._scheduled:
            held.append(data)  # a head and its first body part: at once, together
            self._real.write(b"".join(held))
            held.clear()
            self._open_burst()
        elif self._scheduled:
            held.append(data)
        elif data.startswith(b"HTTP/"):
            held.append(data)  # a head: held for its body (or the end of this turn)
            self._open_burst(held_head=True)
        else:
            self._real.write(data)
            self._open_burst()

    def _open_burst(self, *, held_head: bool = False) -> None:
        if not self._scheduled:
            self._scheduled = not held_head
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._ended and not self._real.is_closing():
                self._real.write(data)

    def close(self) -> None:
        self.flush()
        self._real.close()

    def write_eof(self) -> None:
        self.flush()
        self._ended = True
        self._real.write_eof()

    def abort(self) -> None:
        self._held.clear()
        self._real.abort()

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size() + sum(len(d) for d in self._held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _nothing() -> None:
    pass


def _response(error: LlmrouterError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = encoder.encode(error.to_body())
    return b"".join(
        (
            STATUS_LINE[error.status],
            *(name + b": " + value + b"\r\n" for name, value in default_headers),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )
