"""Just enough HTTP on raw ASGI: a request with a size-limited body reader, and JSON responses.

The hot path builds no framework objects per request; headers are read once into a dict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from llmrouter.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType, quoted

if TYPE_CHECKING:
    from llmrouter.api.pipeline import Accounting

__all__ = ["ON_DISCONNECT", "REFUSED_BY_EDGE", "Receive", "Request", "Scope", "Send", "send_bytes"]

# Set in a request's scope by the connection (api/protocol.py) when it refused the request while
# the app was handling it (its body too slow, or its chunked framing too large), to the error it
# answered: the request then ends as that error, not as a client that left.
REFUSED_BY_EDGE = "llmrouter.refused_by_edge"
# Put in a request's scope by the connection (api/protocol.py), as None: the request may set it
# to a function, which the connection calls if the client leaves before the response is whole.
ON_DISCONNECT = "llmrouter.on_disconnect"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Request:
    __slots__ = (
        "_watcher",
        "accounting",
        "headers",
        "log",
        "method",
        "path",
        "query",
        "receive",
        "repeated",
        "request_id",
        "scope",
        "send",
        "watch_disconnect",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope.get("query_string", b"")
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        # Names sent more than once: the router reads each header it uses as one value, and a proxy
        # in front that read the first of two would disagree with it about the second.
        self.repeated: frozenset[bytes] = (
            _repeated(scope["headers"]) if len(self.headers) < len(scope["headers"]) else frozenset()
        )
        self.request_id = request_id
        self.log: dict[str, Any] = {}  # what the handler wants in this request's log line
        # Long-running handlers: once the body is in, a client that leaves cancels the handler
        # (and with it any upstream call or queued local generation).
        self.watch_disconnect = False
        self._watcher: asyncio.Future[None] | None = None
        # A completion's ledger record in the making; the app writes it if the handler did not.
        self.accounting: Accounting | None = None

    def header(self, name: bytes) -> str | None:
        """The value of a header the router acts on; 400 if the request sent it more than once."""
        if name in self.repeated:
            shown = name.decode("latin-1")
            raise InvalidRequest(f"The request has more than one {shown} header.", param=shown)
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None

    def require_json(self) -> None:
        content_type = (self.header(b"content-type") or "").encode("latin-1")
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != b"application/json":
            shown = quoted(media.decode("latin-1")) if media else "none"
            raise UnsupportedMediaType(
                f"The body must be JSON sent as 'Content-Type: application/json' (got {shown}).",
                param="content-type",
            )

    async def body(self, limit: int) -> bytes:
        """The whole body, refusing (413) as soon as more than `limit` bytes have arrived, or at
        once when its Content-Length says it will be larger."""
        declared = self.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"The request body is larger than the limit of {limit} bytes.", param="body"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                refusal = self.scope.get(REFUSED_BY_EDGE)
                if refusal is not None:  # the connection refused it (and said so to the client)
                    raise refusal
                raise ConnectionAbortedError("client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The request body is larger than the limit of {limit} bytes.", param="body"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                if self.watch_disconnect:
                    self._watch()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _watch(self) -> None:
        """From now on, a client that leaves cancels the handler: the connection says so where
        it can (no task), else a task waits for `http.disconnect`."""
        handler = asyncio.current_task()
        assert handler is not None
        if ON_DISCONNECT in self.scope:
            self.scope[ON_DISCONNECT] = handler.cancel
        else:  # (ASGI's receive says `http.disconnect` once the response is whole, too)
            self._watcher = asyncio.ensure_future(self._cancel_on_disconnect(handler))
            self.send = _StopWatching(self.send, self._watcher)

    async def _cancel_on_disconnect(self, handler: asyncio.Task[Any]) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        handler.cancel()

    def stop_watching(self) -> None:
        """The handler is over: a client that leaves now cancels nothing."""
        if self.scope.get(ON_DISCONNECT) is not None:
            self.scope[ON_DISCONNECT] = None
        if self._watcher is not None:  # the send that wraps it cancels it and lets it go
            self._watcher = None
            assert isinstance(self.send, _StopWatching)
            self.send.stop()


class _StopWatching:
    """A send that stops the watcher before a response's last part: the handler may go on (the
    usage settled, say), and a client that leaves then has left nothing unfinished."""

    __slots__ = ("_send", "_watcher")

    def __init__(self, send: Send, watcher: asyncio.Future[None]) -> None:
        self._send = send
        self._watcher: asyncio.Future[None] | None = watcher

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.stop()
        await self._send(message)


def _repeated(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    seen: set[bytes] = set()
    repeated: set[bytes] = set()
    for name, _ in headers:
        (repeated if name in seen else seen).add(name)
    return frozenset(repeated)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
