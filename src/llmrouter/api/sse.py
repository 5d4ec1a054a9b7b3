"""Server-Sent Events framing for completion streams, and the chunks of one stream."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from msgspec import UNSET

from llmrouter.api.http import Send
from llmrouter.wire.completions import Usage, encoder

if TYPE_CHECKING:
    from llmrouter.providers.base import StreamPart
    from llmrouter.routing.plan import Target

__all__ = ["DONE", "KEEPALIVE", "ChunkStream", "event", "start_stream"]

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


class ChunkStream:
    """One stream's chunks in an API's chunk type (`pipeline.Chunks`): one struct, re-encoded
    with each part's choices (as the API spells them: `choices`) and, last, the usage."""

    __slots__ = ("_chunk", "_include_usage")

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

    def choices(self, part: StreamPart) -> list[Any]:
        return part.choices

    def retarget(self, target: Target) -> None:
        self._chunk.model, self._chunk.provider = target.model.id, target.deployment.provider

    def parts(self, parts: list[StreamPart]) -> bytes:
        chunk, body = self._chunk, bytearray()
        for part in parts:  # (each event encoded in place, at the end of the one body)
            chunk.choices = self.choices(part)
            chunk.system_fingerprint = part.system_fingerprint
            body += b"data: "
            encoder.encode_into(chunk, body, -1)
            body += b"\n\n"
        return bytes(body)

    def usage(self, usage: Usage) -> bytes:
        if not self._include_usage:
            return b""
        chunk = self._chunk
        chunk.choices = []
        chunk.usage = usage
        return event(encoder.encode(chunk))
