"""Server-Sent Events framing for completion streams."""

from __future__ import annotations

from llmrouter.api.http import Send

__all__ = ["DONE", "KEEPALIVE", "event", "start_stream"]

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
