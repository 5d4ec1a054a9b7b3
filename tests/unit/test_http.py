"""The shared HTTP transport (`providers/_http.py`): the one exception map, SSE framing, statuses."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import time
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmrouter.errors import (
    ContextLengthExceeded,
    ProviderError,
    UpstreamAuthFailed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llmrouter.providers import _client, _http
from llmrouter.providers._http import (
    Event,
    EventStream,
    MockResponse,
    parse_retry_after,
    status_error,
    translate,
)
from llmrouter.settings import Timeouts

SECRET = "sk-canary-0123456789abcdef"


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


# What the client (`_client`) and the network under it raise: the OS's errors (connection,
# DNS, TLS and timeouts among them) and the client's own.
ALL_NETWORK = sorted(
    {c for c in _subclasses(OSError) if c.__module__ in ("builtins", "ssl", "socket", "asyncio")}
    | {OSError, _client.ProtocolError, ssl.SSLError, socket.gaierror},
    key=lambda c: (c.__module__, c.__name__),
)


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance of `cls` whose text quotes a secret, which no translated message may repeat."""
    try:
        return cls(111, SECRET)
    except TypeError:
        return cls(SECRET)


def test_the_walk_finds_the_network_s_exception_tree() -> None:
    names = {c.__name__ for c in ALL_NETWORK}
    assert {"ConnectionResetError", "ConnectionRefusedError", "TimeoutError", "gaierror"} <= names
    assert {"SSLError", "SSLCertVerificationError", "ProtocolError", "BrokenPipeError"} <= names


@pytest.mark.parametrize("cls", ALL_NETWORK, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_network_exception_becomes_a_provider_error_without_its_text(cls: type) -> None:
    exc = _instance(cls)
    error = translate(exc, "upstream-a")
    assert isinstance(error, ProviderError)
    assert error.retryable  # a network failure is the deployment's, never the end of the request
    assert "upstream-a" in error.message and SECRET not in error.message
    assert isinstance(error, UpstreamTimeout if isinstance(exc, TimeoutError) else UpstreamUnavailable)


@pytest.mark.parametrize(
    "exc",
    [TimeoutError(SECRET), TimeoutError(), ConnectionResetError(104, SECRET), OSError(SECRET),
     ValueError(SECRET), RuntimeError(SECRET)],
    ids=lambda e: type(e).__name__,
)  # fmt: skip
def test_other_exceptions_are_translated_too(exc: BaseException) -> None:
    error = translate(exc, "p")
    assert isinstance(error, UpstreamTimeout if isinstance(exc, TimeoutError) else UpstreamUnavailable)
    assert SECRET not in error.message


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (301, {}, UpstreamUnavailable, None),
        (400, {}, UpstreamRejected, None),
        (422, {}, UpstreamRejected, None),
        (401, {}, UpstreamAuthFailed, None),
        (403, {}, UpstreamAuthFailed, None),
        (408, {}, UpstreamTimeout, None),
        (429, {"Retry-After": "7"}, UpstreamRateLimited, 7.0),
        (429, {}, UpstreamRateLimited, None),
        (500, {}, UpstreamUnavailable, None),
        (503, {"retry-after": "3"}, UpstreamUnavailable, 3.0),
    ],
)
def test_statuses_map_onto_the_error_tree(
    status: int, headers: dict[str, str], kind: type, retry_after: float | None
) -> None:
    error = status_error("p", status, _client.Headers(headers), "said")
    assert type(error) is kind and error.retry_after == retry_after


def test_a_recognised_body_and_a_body_delay_win() -> None:
    error = status_error("p", 400, _client.Headers({}), "too long", recognised=ContextLengthExceeded)
    assert isinstance(error, ContextLengthExceeded)
    error = status_error("p", 429, _client.Headers({}), "", retry_after=4.5)
    assert error.retry_after == 4.5
    error = status_error("p", 429, _client.Headers({"retry-after": "2"}), "", retry_after=4.5)
    assert error.retry_after == 2.0  # the header is the protocol's own word


def test_retry_after_is_seconds_or_a_date_within_an_hour() -> None:
    assert parse_retry_after("7") == 7.0
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert later is not None and 25 < later <= 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("inf") is None and parse_retry_after("1e400") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("999999") == 3600  # capped at an hour


# -- SSE framing ----------------------------------------------------------------------------------


async def _events(
    pieces: list[bytes | float | BaseException], first: float = 5, idle: float = 5
) -> list[Event]:
    return [e for batch in await _batches(pieces, first, idle) for e in batch]


async def _batches(
    pieces: list[bytes | float | BaseException], first: float = 5, idle: float = 5
) -> list[list[Event]]:
    response = MockResponse(200, pieces)
    stream = EventStream(response, first=first, idle=idle, provider="p")
    try:
        batches = [batch async for batch in stream]
        assert all(batches), "no batch is empty"
        return batches
    finally:
        stream.release()
        assert response.released


OPENAI_STREAM = b'data: {"a":1}\n\ndata: {"b":2}\n\n: a comment\n\ndata: [DONE]\n\n'
ANTHROPIC_STREAM = (
    b'event: message_start\r\ndata: {"type":"message_start"}\r\n\r\n'
    b'event: ping\r\ndata: {"type": "ping"}\r\n\r\n'
    b'event: content_block_delta\r\ndata: {"x":\r\ndata: 1}\r\nid: 4\r\n\r\n'
)


def test_data_only_and_named_event_streams_are_framed() -> None:
    got = asyncio.run(_events([OPENAI_STREAM]))
    assert got == [
        Event("message", b'{"a":1}'),
        Event("message", b'{"b":2}'),
        Event("message", b"[DONE]"),
    ]
    got = asyncio.run(_events([ANTHROPIC_STREAM]))
    assert [e.name for e in got] == ["message_start", "ping", "content_block_delta"]
    assert got[2].data == b'{"x":\n1}'  # data lines joined by newlines, as SSE says


@given(st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_STREAM)), max_size=8))
def test_framing_does_not_depend_on_where_the_network_cuts(cuts: list[int]) -> None:
    points = sorted({0, *cuts, len(ANTHROPIC_STREAM)})
    pieces: list[bytes | float | BaseException] = [
        ANTHROPIC_STREAM[a:b] for a, b in itertools.pairwise(points) if b > a
    ]
    assert asyncio.run(_events(pieces)) == asyncio.run(_events([ANTHROPIC_STREAM]))


def test_the_events_of_one_read_come_together() -> None:
    """A batch is what one read completes: a read that ends no event adds to the next one's."""
    got = asyncio.run(_batches([OPENAI_STREAM, b"data: 3\n\ndata: 4", b"\n\n", b"data: 5\n\n"]))
    assert [[e.data for e in batch] for batch in got] == [
        [b'{"a":1}', b'{"b":2}', b"[DONE]"],
        [b"3"],
        [b"4"],
        [b"5"],
    ]
    got = asyncio.run(_batches([b"data: 1\n", b"\nda", b"ta: 2\n\ndata: 3\n\n"]))
    assert [[e.data for e in batch] for batch in got] == [[b"1"], [b"2", b"3"]]


def test_an_unfinished_last_event_is_not_an_event() -> None:
    assert asyncio.run(_events([b'data: {"a":1}\n\ndata: {"cut'])) == [Event("message", b'{"a":1}')]


def test_first_and_idle_waits_are_separate() -> None:
    with pytest.raises(UpstreamTimeout):
        asyncio.run(_events([0.2, b"data: x\n\n"], first=0.05))
    assert len(asyncio.run(_events([0.2, b"data: x\n\n"], first=1, idle=0.05))) == 1
    with pytest.raises(UpstreamTimeout):
        asyncio.run(_events([b"data: x\n\n", 0.2, b"data: y\n\n"], first=1, idle=0.05))


def test_a_reset_mid_stream_is_translated_and_a_huge_line_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(UpstreamUnavailable, match="unreachable: ProtocolError"):
        asyncio.run(_events([b"data: x\n\n", _client.ProtocolError("closed inside the body")]))
    monkeypatch.setattr(_http, "MAX_SSE_LINE", 100)
    with pytest.raises(UpstreamUnavailable, match="over 100 bytes"):
        asyncio.run(_events([b"data: " + b"x" * 200]))


def test_an_error_status_is_read_by_the_adapter_before_any_event() -> None:
    from llmrouter.providers.openai_chat import OpenAIChatAdapter
    from llmrouter.settings import CheckSettings, OpenAIChatProvider

    response = MockResponse(429, [b'{"error": {"message": "slow down"}}'], {"retry-after": "2"})

    async def handler(request: _http.Request) -> MockResponse:
        return response

    async def run() -> None:
        adapter = OpenAIChatAdapter(
            "p", OpenAIChatProvider(), [], CheckSettings(), _http.MockTransport(handler)
        )
        with pytest.raises(UpstreamRateLimited, match="slow down") as caught:
            async with adapter.events("http://x", b"{}", Timeouts(), {}):
                raise AssertionError("no events")
        assert caught.value.retry_after == 2 and response.released

    asyncio.run(run())


def test_the_mock_transport_times_out_headers_like_the_real_one() -> None:
    async def hang(request: _http.Request) -> MockResponse:
        await asyncio.sleep(10)
        return MockResponse()

    async def run() -> None:
        transport = _http.MockTransport(hang)
        with pytest.raises(UpstreamTimeout):
            await transport.send(_http.Request("POST", "http://x"), Timeouts(first_token=0.05))

    asyncio.run(run())


# -- the real transport, against a real server in process -----------------------------------------


async def _serving(handler: Any) -> tuple[Any, str, set[Any]]:
    from aiohttp import web

    peers: set[Any] = set()

    async def counted(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application()
    app.router.add_post("/x", counted)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/x", peers


def test_an_error_body_in_two_pieces_is_read_whole() -> None:
    from aiohttp import web

    body = (
        b'{"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}'
    )

    async def split(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:20])
        await asyncio.sleep(0.05)
        await response.write(body[20:])
        return response

    async def run() -> None:
        runner, url, _ = await _serving(split)
        transport = _http.HttpTransport("p", max_connections=4)
        await transport.start()
        try:
            response = await transport.send(_http.Request("POST", url, b"{}"), Timeouts())
            assert await _http.error_body(response) == body
        finally:
            await transport.aclose()
            await runner.cleanup()

    asyncio.run(run())


def test_a_finished_stream_gives_its_connection_back() -> None:
    from aiohttp import web

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\ndata: [DONE]\n\n")
        await asyncio.sleep(0.05)  # the body's end comes a moment after its last event
        await response.write_eof()
        return response

    async def run() -> set[Any]:
        runner, url, peers = await _serving(sse)
        transport = _http.HttpTransport("p", max_connections=4)
        await transport.start()
        try:
            for _ in range(5):
                response = await transport.send(_http.Request("POST", url, b"{}"), Timeouts())
                stream = _http.EventStream(response, first=1, idle=1, provider="p")
                async for batch in stream:
                    if batch[-1].data == b"[DONE]":
                        stream.finish()  # the rest is read in the background:
                        break
                await asyncio.gather(*_http._DRAINING)  # (done before the next call here)
        finally:
            await transport.aclose()
            await runner.cleanup()
        return peers

    assert len(asyncio.run(run())) == 1  # five streams, one connection


def test_the_answer_does_not_wait_for_the_body_to_end_after_its_last_event() -> None:
    """An upstream that keeps the body open after its stream's last event: the stream is over
    for the router at that event, not when the body ends (which is read in the background)."""
    from aiohttp import web

    from llmrouter.providers.openai_chat import OpenAIChatAdapter
    from llmrouter.settings import CheckSettings, OpenAIChatProvider

    order: list[str] = []
    released = asyncio.Event()

    async def lingering(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        for event in (chunk, usage):
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await asyncio.wait_for(released.wait(), 5)  # held open until the test has its answer
        order.append("body ended")
        await response.write_eof()
        return response

    async def run() -> None:
        runner, url, _ = await _serving(lingering)
        settings = OpenAIChatProvider(base_url=url.removesuffix("/x"))
        adapter = OpenAIChatAdapter("p", settings, [], CheckSettings())
        adapter._url = url  # (the test server's one path)
        await adapter.start()
        try:
            from tests.unit.test_adapters import call

            parts = [p async for batch in adapter.stream(call(stream=True)) for p in batch]
            order.append("answer complete")
            assert parts[-1].usage is not None and parts[-1].usage.total_tokens == 2
            released.set()
            await asyncio.gather(*_http._DRAINING)
        finally:
            await adapter.aclose()
            await runner.cleanup()

    asyncio.run(run())
    assert order == ["answer complete", "body ended"]
