"""Server-Sent Events framing for completion streams, and the chunks of one stream."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from msgspec import UNSET, UnsetType

from llmrouter.api.http import Send
from llmrouter.wire.completions import Usage, encoder

if TYPE_CHECKING:
    from llmrouter.providers.base import StreamPart
    from llmrouter.routing.plan import Target

__all__ = ["DONE", "KEEPALIVE", "ChunkStream", "Keepalive", "event", "start_stream"]

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": llmrouter processing\n\n"


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def start_stream(send: Send, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
                *headers,
            ],
        }
    )


class Keepalive:
    """While a stream waits for its first token, in the task that waits: after `seconds`, the
    stream's start and a comment line, and another comment every `seconds` after, so that proxies
    keep the connection open. The sending is a task of its own, made only when the first comment
    is due (the wait is usually shorter). A send is never cut off: `stop()` lets one under way
    finish (it may wait for a slow client) and stops the task between sends. A send that fails
    (the client left) cancels the waiting task, and `stop()` then raises that failure."""

    __slots__ = (
        "_failure", "_headers", "_owner", "_seconds", "_send", "_sending", "_stopping", "_task",
        "_timer", "started",
    )  # fmt: skip

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]], seconds: float) -> None:
        owner = asyncio.current_task()
        assert owner is not None, "a task waits for the stream"
        self._owner = owner
        self._send = send
        self._headers = headers
        self._seconds = seconds
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._sending = self._stopping = False
        self._timer = asyncio.get_running_loop().call_later(seconds, self._due)
        self.started = False  # the stream's start has been sent

    def _due(self) -> None:
        self._task = asyncio.ensure_future(self._beat())

    async def _beat(self) -> None:
        try:
            while not self._stopping:
                self._sending = True
                try:
                    if not self.started:
                        await start_stream(self._send, self._headers)
                        self.started = True
                    body = {"type": "http.response.body", "body": KEEPALIVE, "more_body": True}
                    await self._send(body)
                finally:
                    self._sending = False
                if not self._stopping:
                    await asyncio.sleep(self._seconds)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # (the client left): the wait is for nothing now
            self._failure = exc
            self._owner.cancel()

    async def stop(self) -> bool:
        """No more comments (one being sent is sent first); whether the stream's start has been
        sent. Raises the failure of a send that failed."""
        self._timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            if not self._sending:
                task.cancel()  # (between sends: asleep, or not begun)
            try:
                if not task.done():
                    await asyncio.wait((task,))
            except asyncio.CancelledError:  # (the client left meanwhile: the send is for nothing)
                task.cancel()
                raise
        failure, self._failure = self._failure, None
        if failure is not None:
            self._owner.uncancel()  # (the cancellation was the failure's, raised instead)
            raise failure
        return self.started


class ChunkStream:
    """One stream's chunks in an API's chunk type (`pipeline.Chunks`). Each event differs from the
    last only in its choices (as the API spells them: `choices`) and, rarely, the system
    fingerprint, so what comes before the choices is encoded once and each event encodes only its
    choices; the last event has the usage."""

    __slots__ = ("_chunk", "_fingerprint", "_include_usage", "_prefix", "_suffix")

    def __init__(self, kind: Any, request_id: str, target: Target, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._chunk = kind(
            id=request_id,
            created=int(time.time()),
            model=target.model.id,
            provider=target.deployment.provider,
            choices=[],
            usage=None if include_usage else UNSET,
        )
        self._prefix = b""
        self._suffix = b""
        self._fingerprint: str | UnsetType | None = None  # the one `_prefix` has (None: none yet)

    def choices(self, part: StreamPart) -> list[Any]:
        return part.choices

    def retarget(self, target: Target) -> None:
        self._chunk.model, self._chunk.provider = target.model.id, target.deployment.provider
        self._fingerprint = None

    def _frame(self, fingerprint: str | UnsetType) -> None:
        """The event's bytes before its choices and after them. The chunk's fields before
        `choices` are its id, names and fingerprint, all encoded before the key `"choices":`,
        which cannot appear inside an encoded string (whose quotes are escaped)."""
        chunk = self._chunk
        chunk.choices = []
        chunk.system_fingerprint = fingerprint
        encoded = encoder.encode(chunk)
        at = encoded.index(b'"choices":[]') + len(b'"choices":')
        self._prefix = b"data: " + encoded[:at]
        self._suffix = encoded[at + 2 :] + b"\n\n"
        self._fingerprint = fingerprint

    def parts(self, parts: list[StreamPart]) -> bytes:
        body = bytearray()
        for part in parts:  # (each event encoded in place, at the end of the one body)
            fingerprint = part.system_fingerprint
            if fingerprint is not self._fingerprint and fingerprint != self._fingerprint:
                self._frame(fingerprint)
            body += self._prefix
            encoder.encode_into(self.choices(part), body, -1)
            body += self._suffix
        return bytes(body)

    def usage(self, usage: Usage) -> bytes:
        if not self._include_usage:
            return b""
        chunk = self._chunk
        chunk.choices = []
        chunk.usage = usage
        return event(encoder.encode(chunk))
