"""A mock OpenAI-compatible upstream, fast enough not to be the bottleneck of a benchmark.

    python bench/mock_upstream.py PORT [--host 127.0.0.1] [--max-seconds N]

`POST /v1/completions` answers a fixed small completion; with `"stream": true` in the JSON body it
answers an SSE stream of five text chunks, a usage chunk and `data: [DONE]` (a hundred text chunks
when the body names the model `mock-model-100`, for what a long stream costs). The chat wire formats
answer the same text in their own shapes, whole or streamed: OpenAI's `POST /v1/chat/completions`,
Anthropic's `POST /v1/messages` (named events) and Gemini's
`POST /v1beta/models/M:generateContent` (`:streamGenerateContent?alt=sse`). `GET /health` and
`GET /v1/models` answer too; anything else is a 404.

It is a raw `asyncio.Protocol` HTTP/1.1 server on uvloop, not a framework: keep-alive, pipelining
(requests are answered in order), bodies framed by Content-Length or chunked transfer-encoding and
read in full across partial reads. Every response is pre-encoded at start, so a request costs one
header parse and one `write`. `--max-seconds` makes it exit on its own (the benchmark uses it so
that nothing outlives a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import cast

import uvloop

MODEL = "mock-model"
TEXT_PARTS = ("Hello", "!", " How", " can I", " help?")
_MAX_HEAD = 64 * 1024
_MAX_BODY = 8 * 1024 * 1024


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _response(status: bytes, content_type: bytes, body: bytes, *, close: bool = False) -> bytes:
    head = (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _build() -> dict[str, bytes]:
    created = int(time.time())
    stream_head = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
    )
    usage = {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    completion = _json(
        {
            "id": "cmpl-mock0000000000000000",
            "object": "text_completion",
            "created": created,
            "model": MODEL,
            "choices": [
                {"text": "".join(TEXT_PARTS), "index": 0, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
    )
    short = _completion_events(created, TEXT_PARTS, usage)
    long_parts = tuple(f" word{i}" for i in range(100))
    long = _completion_events(created, long_parts, {**usage, "completion_tokens": 100})
    chat, messages, gemini = _chat_kinds(created)
    models = _json({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock"}]})
    return {
        "completion": _response(b"200 OK", b"application/json", completion),
        "stream": stream_head + b"".join(_chunk(e) for e in short) + b"0\r\n\r\n",
        "stream100": stream_head + b"".join(_chunk(e) for e in long) + b"0\r\n\r\n",
        "models": _response(b"200 OK", b"application/json", models),
        "chat": _response(b"200 OK", b"application/json", chat[0]),
        "chat_stream": stream_head + b"".join(_chunk(e) for e in chat[1]) + b"0\r\n\r\n",
        "messages": _response(b"200 OK", b"application/json", messages[0]),
        "messages_stream": stream_head + b"".join(_chunk(e) for e in messages[1]) + b"0\r\n\r\n",
        "gemini": _response(b"200 OK", b"application/json", gemini[0]),
        "gemini_stream": stream_head + b"".join(_chunk(e) for e in gemini[1]) + b"0\r\n\r\n",
        "health": _response(b"200 OK", b"text/plain", b"ok"),
        "not_found": _response(
            b"404 Not Found", b"application/json", _json({"error": {"message": "not found"}})
        ),
        "bad_request": _response(b"400 Bad Request", b"text/plain", b"bad request", close=True),
    }


def _completion_events(created: int, parts: tuple[str, ...], usage: dict[str, int]) -> list[bytes]:
    """A streamed completion of `parts`: one event a part, a usage event and `[DONE]`."""
    events: list[bytes] = []
    for i, text in enumerate(parts):
        last = i == len(parts) - 1
        chunk = {
            "id": "cmpl-mock0000000000000000",
            "object": "text_completion",
            "created": created,
            "model": MODEL,
            "choices": [
                {
                    "text": text,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop" if last else None,
                }
            ],
        }
        events.append(b"data: " + _json(chunk) + b"\n\n")
    usage_chunk = {
        "id": "cmpl-mock0000000000000000",
        "object": "text_completion",
        "created": created,
        "model": MODEL,
        "choices": [],
        "usage": usage,
    }
    events.append(b"data: " + _json(usage_chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _chat_kinds(created: int) -> list[tuple[bytes, list[bytes]]]:
    """The whole answer and the stream's events of OpenAI chat, Anthropic and Gemini."""
    text = "".join(TEXT_PARTS)
    base = {"id": "chatcmpl-mock", "created": created, "model": MODEL}
    usage = {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    message = {"role": "assistant", "content": text}
    chat = _json({**base, "object": "chat.completion", "usage": usage,
                  "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})  # fmt: skip
    chunks = [
        {**base, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"content": t},
                      "finish_reason": "stop" if i == len(TEXT_PARTS) - 1 else None}]}
        for i, t in enumerate(TEXT_PARTS)
    ]  # fmt: skip
    chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    chat_events = [b"data: " + _json(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]

    claude_usage = {"input_tokens": 3, "output_tokens": 8}
    msg = {"id": "msg_mock", "type": "message", "role": "assistant", "model": MODEL,
           "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": claude_usage}  # fmt: skip
    start = {**msg, "content": [], "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 1}}
    named = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": t}}) for t in TEXT_PARTS),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                           "stop_sequence": None}, "usage": {"output_tokens": 8}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    claude_events = [b"event: " + n.encode() + b"\ndata: " + _json(d) + b"\n\n" for n, d in named]

    def candidate(t: str, finish: str | None) -> dict[str, object]:
        c: dict[str, object] = {"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}
        if finish:
            c["finishReason"] = finish
        return c

    meta = {"promptTokenCount": 3, "candidatesTokenCount": 8, "totalTokenCount": 11}
    gemini = _json(
        {"candidates": [candidate(text, "STOP")], "usageMetadata": meta, "modelVersion": MODEL}
    )
    gemini_events = [
        b"data: " + _json({"candidates": [candidate(t, "STOP" if i == len(TEXT_PARTS) - 1 else None)],
                           "usageMetadata": meta, "modelVersion": MODEL}) + b"\r\n\r\n"
        for i, t in enumerate(TEXT_PARTS)
    ]  # fmt: skip
    return [(chat, chat_events), (_json(msg), claude_events), (gemini, gemini_events)]


RESPONSES = _build()
_CLOSE_HEADER = b"Connection: close\r\n"


def _with_close(response: bytes) -> bytes:
    """The same response, announcing that the connection closes after it."""
    end = response.index(b"\r\n") + 2
    return response[:end] + _CLOSE_HEADER + response[end:]


def _wants_stream(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body starting at `start`: (body, end offset), or None until it is complete.
    Raises ValueError when it is malformed."""
    pos = start
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip(), 16)
        pos = eol + 2
        if size == 0:
            # Trailers, if any, end with an empty line.
            end = buf.find(b"\r\n", pos)
            while end >= 0 and end != pos:
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return b"".join(parts), end + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


class HttpProtocol(asyncio.Protocol):
    __slots__ = ("buf", "transport")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        close = False
        while buf and not close:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buf) > _MAX_HEAD:
                    out.append(RESPONSES["bad_request"])
                    close = True
                break
            try:
                parsed = self._parse(buf, head_end)
            except ValueError:
                out.append(RESPONSES["bad_request"])
                close = True
                break
            if parsed is None:  # the body has not fully arrived yet
                break
            response, end, keep_alive = parsed
            del buf[:end]
            if not keep_alive:
                response = _with_close(response)
                close = True
            out.append(response)
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            buf.clear()
            transport.close()

    @staticmethod
    def _parse(buf: bytearray, head_end: int) -> tuple[bytes, int, bool] | None:
        lines = bytes(buf[:head_end]).split(b"\r\n")
        method, path, version = lines[0].split(b" ", 2)
        content_length = 0
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                content_length = int(value.strip())
                if content_length < 0 or content_length > _MAX_BODY:
                    raise ValueError("bad content-length")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                connection = value.strip().lower()
        start = head_end + 4
        if chunked:
            framed = _dechunk(buf, start)
            if framed is None:
                return None
            body, end = framed
        else:
            end = start + content_length
            if len(buf) < end:
                return None
            body = bytes(buf[start:end])
        # HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes unless told.
        keep_alive = connection == b"keep-alive" if version == b"HTTP/1.0" else connection != b"close"
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/completions", b"/completions"):
            key = "completion"
            if _wants_stream(body):
                key = "stream100" if b'"mock-model-100"' in body else "stream"
        elif method == b"POST" and path == b"/v1/chat/completions":
            key = "chat_stream" if _wants_stream(body) else "chat"
        elif method == b"POST" and path == b"/v1/messages":
            key = "messages_stream" if _wants_stream(body) else "messages"
        elif method == b"POST" and path.endswith(b":streamGenerateContent"):
            key = "gemini_stream"
        elif method == b"POST" and path.endswith(b":generateContent"):
            key = "gemini"
        elif method == b"GET" and path == b"/health":
            key = "health"
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            key = "models"
        else:
            key = "not_found"
        return RESPONSES[key], end, keep_alive


async def serve(host: str, port: int, max_seconds: float | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, host, port, backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if max_seconds is not None:
        loop.call_later(max_seconds, stop.set)
    print(f"mock upstream listening on http://{host}:{port}/v1", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-seconds", type=float, default=None, help="exit after this many seconds")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.max_seconds))


if __name__ == "__main__":
    main()
