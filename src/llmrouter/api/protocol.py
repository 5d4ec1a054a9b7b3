"""The HTTP/1.1 connection: uvicorn's httptools protocol, with the bounds a public edge needs.

uvicorn reads a request's line and headers whole, however large (httptools grows its buffers as
they come, so a 100 MB header costs seconds and gigabytes), waits for ever for a client that sends
one byte a second or nothing at all, and answers a malformed request in plain text. This protocol
keeps uvicorn's request cycle and adds, per connection:

- a size bound on the request line and headers together (`server.max_header_bytes`): past it,
  414 if the request line is not over yet, else 431, and the connection is closed;
- three deadlines (`server.client_timeouts`): `idle` for a connection with no request under way
  (before its first byte, and between requests), `headers` from a request's first byte to the end
  of its headers, `body` from there to the end of its body. Past one, the connection is closed,
  after a 408 when nothing of a response has been sent;
- errors in the spec's shape, for what the parser refuses too.

The bytes of a request's head are counted as they arrive, before httptools sees them, so no more
than the bound (plus what one read brings after a pipelined request) is ever parsed. A deadline is
one timer handle per connection, re-armed as the request moves from head to body; the common path
pays a length check and two timer calls per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from llmrouter.api.http import BODY_TIMED_OUT
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


class EdgeProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, server: ServerSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head = server.max_header_bytes
        timeouts = server.client_timeouts
        # uvicorn's timer between requests is our idle one (uvicorn types it int; a float works).
        self.timeout_keep_alive = timeouts.idle  # type: ignore[assignment]
        self.head_seconds = timeouts.headers
        self.body_seconds = timeouts.body
        self.log_refusals = server.access_log
        self.head_bytes = 0  # of the request whose head is being read
        self.in_head = True  # waiting for, or reading, a request line and headers
        self.in_body = False  # the headers are in, the body is not
        self.line_done = False  # the request line has ended (the head is in its headers)
        self.refused = False  # answered with an error: what else comes is read and dropped
        self.deadline: asyncio.TimerHandle | None = None

    # -- the connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer only after a response; a connection that never sends a
        # byte would be kept for ever.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._unset_keepalive_if_required()
        if not self.in_head:
            self._feed(data)
            return
        if self.deadline is None and self._idle_cycle():
            self.deadline = self.loop.call_later(self.head_seconds, self._head_timed_out)
        if not self.line_done:
            self.line_done = b"\n" in data
        room = self.max_head - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            self._feed(data)
            return
        # More than the head may hold: parse only what it may, and refuse if the head is not over.
        self.head_bytes = self.max_head
        view = memoryview(data)
        self._feed(view[:room])
        if self.transport.is_closing():
            return
        if self.in_head:
            self._refuse_head()
        else:
            self._feed(view[room:])

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

    # -- a request's progress ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.in_body = True
        self._disarm()
        super().on_headers_complete()
        # A pipelined request waits, its body unread, until the response before it is sent: its
        # body's time starts when it does (`on_response_complete`).
        if not self.pipeline:
            self.deadline = self.loop.call_later(self.body_seconds, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_body = False
        self.in_head = True
        self.head_bytes = 0
        self.line_done = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.deadline is not None or self.transport.is_closing():
            return
        if self.in_body:  # a pipelined request, started now, whose body is still to come
            self.deadline = self.loop.call_later(self.body_seconds, self._body_timed_out)
        elif self.in_head and self.head_bytes:  # the next head began while this response was sent
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
        # The app is waiting for the body: tell it why the body ends (it logs the request).
        self.scope[BODY_TIMED_OUT] = True  # type: ignore[literal-required]
        message = f"The request's body did not arrive within {self.body_seconds:g} s."
        self._refuse(RequestTimeout(message, param="body"), logged_by_app=True)

    def _refuse_head(self) -> None:
        limit = f"the limit of {self.max_head} bytes"
        if not self.line_done:
            self._refuse(UriTooLong(f"The request line is longer than {limit}.", param="url"))
        else:
            message = f"The request line and headers are larger than {limit}."
            self._refuse(HeadersTooLarge(message, param="headers"))

    def _refuse(self, error: LlmrouterError, *, logged_by_app: bool = False) -> None:
        """Answer `error` in the spec's shape and close, unless a response has begun (then only
        close). A request the app is handling is ended for it: its receive says the client left,
        its sends fall silent. The access log has a line for the refusal, unless the app, handling
        the request, writes its own."""
        if self.transport.is_closing() or self.refused:
            return
        self.refused = True
        self._disarm()
        cycle = None if self._idle_cycle() else self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
        else:
            if cycle is not None:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(_response(error, self.server_state.default_headers))
            self._linger()
        if self.log_refusals and not logged_by_app:
            access_log({"status": error.status, "error": error.code, "message": error.message})


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
