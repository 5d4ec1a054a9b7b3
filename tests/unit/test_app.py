"""The ASGI app in process: what a failed request leaves behind."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import pytest

from llmrouter.app import create_app, new_request_id
from llmrouter.settings import (
    DeploymentSettings,
    ModelSettings,
    OpenAIProvider,
    ServerSettings,
    Settings,
)


def _app() -> Any:
    return create_app(
        Settings(
            providers={"p": OpenAIProvider(base_url="http://127.0.0.1:9/v1")},
            models=[ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="x")])],
            server=ServerSettings(access_log=False),
        )
    )


async def _request(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": headers}
    await app(scope, receive, send)
    return int(sent[0]["status"])


@pytest.mark.parametrize("path", ["/nowhere", "/api/v1/openapi.json/x", "/health"])
def test_a_request_is_freed_without_the_cyclic_collector(path: str) -> None:
    """A refused request's headers (and body) go when it ends: nothing in the error path keeps
    the exception, whose traceback keeps the frames that keep the request (issue 11: 100 MB
    headers held until the cyclic collector ran)."""
    app = _app()
    value = b"Bearer " + b"x" * 4_000_000
    baseline = sys.getrefcount(value)
    gc.collect()
    gc.disable()
    try:
        status = asyncio.run(_request(app, path, [(b"authorization", value)]))
        assert sys.getrefcount(value) == baseline, f"{path} ({status}) is still referenced"
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"model": "m", "prompt": "' + b"x" * 4_000_000, id="not-json"),
        pytest.param(b'{"model": "m", "prompt": 1, "pad": "' + b"x" * 4_000_000 + b'"}', id="invalid"),
        pytest.param(b'{"model": "nowhere", "prompt": "' + b"x" * 4_000_000 + b'"}', id="no-model"),
        pytest.param(b'{"model": "m", "prompt": "' + b"x" * 4_000_000 + b'"}', id="upstream-down"),
    ],
)
def test_a_refused_body_is_freed_without_the_cyclic_collector(tmp_path: Any, body: bytes) -> None:
    app = create_app(
        Settings(
            providers={"p": OpenAIProvider(base_url="http://127.0.0.1:9/v1")},
            models=[ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="x")])],
            server=ServerSettings(access_log=False, max_body_bytes=8_000_000),
            home=str(tmp_path),
        )
    )
    baseline = sys.getrefcount(body)

    async def run() -> int:
        await app.ctx.start()
        try:
            _, secret = await app.ctx.keys.create("t")
            sent: list[dict[str, Any]] = []

            bodies = [body]

            async def receive() -> dict[str, Any]:
                if bodies:
                    return {"type": "http.request", "body": bodies.pop(), "more_body": False}
                await asyncio.Event().wait()  # the client stays: nothing more comes
                raise AssertionError("unreachable")

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/api/v1/completions",
                "query_string": b"",
                "headers": [
                    (b"authorization", f"Bearer {secret}".encode()),
                    (b"content-type", b"application/json"),
                ],
            }
            gc.collect()
            gc.disable()
            await app(scope, receive, send)
            return int(sent[0]["status"])
        finally:
            await app.ctx.aclose()

    try:
        status = asyncio.run(run())
        assert 400 <= status < 600
        assert sys.getrefcount(body) == baseline, f"the body of a {status} is still referenced"
    finally:
        gc.enable()


# -- a client that leaves --------------------------------------------------------------------------


async def _watched(scope_extra: dict[str, Any]) -> tuple[bool, list[str]]:
    """A handler that reads its body (watching for the client to leave), sends its whole answer,
    then goes on awaiting (as the usage is settled after the answer): cancelled or not."""
    from llmrouter.api.http import Request

    answered = asyncio.Event()
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await answered.wait()  # ASGI: once the response is whole, receive says disconnect
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [], **scope_extra}
    req = Request(scope, receive, send, "id")
    req.watch_disconnect = True

    async def handler() -> None:
        await req.body(100)
        await req.send({"type": "http.response.start", "status": 200, "headers": []})
        await req.send({"type": "http.response.body", "body": b"{}"})
        for _ in range(5):
            await asyncio.sleep(0)

    task = asyncio.ensure_future(handler())
    try:
        await task
    except asyncio.CancelledError:
        return True, sent
    finally:
        req.stop_watching()
    return False, sent


@pytest.mark.parametrize("edge", [False, True], ids=["any-asgi-server", "llmrouter-edge"])
def test_a_handler_that_goes_on_after_its_answer_is_not_cancelled(edge: bool) -> None:
    """A whole answer is no client that left, whether a task watches `receive` (any ASGI
    server) or the connection says so itself (llmrouter's edge): every request with limits in
    Redis, whose usage is settled after its answer, was counted a 499."""
    extra = {"llmrouter.on_disconnect": None} if edge else {}
    cancelled, sent = asyncio.run(_watched(extra))
    assert sent == ["http.response.start", "http.response.body"]
    assert not cancelled


def test_the_edge_s_hook_cancels_a_handler_whose_client_left() -> None:
    from llmrouter.api.http import ON_DISCONNECT, Request

    async def main() -> bool:
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/x", "headers": []}
        scope[ON_DISCONNECT] = None

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        req = Request(scope, receive, send, "id")
        req.watch_disconnect = True

        async def handler() -> None:
            await req.body(100)
            assert scope[ON_DISCONNECT] is not None and req._watcher is None  # no task
            scope[ON_DISCONNECT]()  # the connection: the client has gone
            await asyncio.sleep(1)

        try:
            await asyncio.ensure_future(handler())
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main())


def test_a_watched_request_that_ends_unanswered_is_freed_without_the_cyclic_collector() -> None:
    """Any ASGI server: the watcher's task (cancelled, holding its frame) must not stay
    referenced by the request's send once the handler is over."""
    from llmrouter.api.http import Request

    value = b"x" * 1_000_000
    baseline = sys.getrefcount(value)

    async def main() -> None:
        asked = 0

        async def receive() -> dict[str, Any]:
            nonlocal asked
            asked += 1
            if asked > 1:
                await asyncio.Event().wait()  # the client neither sends nor leaves
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"x-big", value)]}
        req = Request(scope, receive, send, "id")
        req.watch_disconnect = True
        try:
            await req.body(100)
            await asyncio.sleep(0)  # the watcher waits on receive
        finally:
            req.stop_watching()
        await asyncio.sleep(0)  # the watcher unwinds

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
        assert sys.getrefcount(value) == baseline
    finally:
        gc.enable()


def test_request_ids_keep_openais_shape_and_come_in_time_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Time first, so that the ledger's primary key grows near its end (a page a record
    otherwise), with 80 random bits after it: unique, and not to be guessed from another id."""
    import re

    import llmrouter.app

    now = [1_764_000_000_000_000_000]  # (ns; the wall clock, held still by the test)
    monkeypatch.setattr(llmrouter.app.time, "time_ns", lambda: now[0])
    first = new_request_id("cmpl-")
    now[0] += 1_000_000  # a millisecond on
    later = [new_request_id("cmpl-") for _ in range(10_000)]
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{32}", i) for i in [first, *later])
    assert all(first < i for i in later) and len(set(later)) == len(later)
    assert int(first[5:17], 16) == now[0] // 1_000_000 - 1
    assert len({i[17:] for i in later}) == len(later)  # (the random part alone differs)
    assert new_request_id("chatcmpl-").startswith("chatcmpl-")


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_an_answered_request_leaves_nothing_for_the_cyclic_collector(
    tmp_path: Any, stream: bool
) -> None:
    """A request's objects go when it ends, a stream's as an answer's: nothing of it is left
    in a reference cycle (a stream's run of attempts was, with its plan, shapes and stream,
    until the cyclic collector ran: 26 objects a stream)."""
    from llmrouter.providers import _http

    events = b"".join(
        b'data: {"choices":[{"text":"%s","index":0,"finish_reason":%s}]}\n\n' % (t, f)
        for t, f in ((b"Hel", b"null"), (b"lo", b'"stop"'))
    )
    usage = b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'
    events += b'data: {"choices":[],%s}\n\ndata: [DONE]\n\n' % usage
    whole = b'{"choices":[{"text":"Hello","index":0,"finish_reason":"stop"}],%s}' % usage

    async def upstream(request: _http.Request) -> _http.MockResponse:
        return _http.MockResponse(200, events if b'"stream":true' in (request.body or b"") else whole)

    app = create_app(
        Settings(
            providers={"p": OpenAIProvider(base_url="http://127.0.0.1:9/v1")},
            models=[ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="x")])],
            server=ServerSettings(access_log=False),
            home=str(tmp_path),
        )
    )
    for provider in app.ctx.catalog.providers.values():
        provider.transport = _http.MockTransport(upstream, name="p")  # type: ignore[attr-defined]
    body = b'{"model": "m", "prompt": "Say hi", "max_tokens": 5%s}' % (
        b', "stream": true' if stream else b""
    )

    async def one(headers: list[tuple[bytes, bytes]]) -> bytes:
        sent: list[dict[str, Any]] = []
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/completions",
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, receive, send)
        assert sent[0]["status"] == 200, sent
        return b"".join(m.get("body", b"") for m in sent[1:])

    async def run() -> int:
        await app.ctx.start()
        try:
            _, secret = await app.ctx.keys.create("t")
            headers = [
                (b"authorization", f"Bearer {secret}".encode()),
                (b"content-type", b"application/json"),
            ]
            answer = await one(headers)  # (the first request's one-off objects made)
            assert (b"[DONE]" in answer) == stream and b"lo" in answer
            gc.collect()
            gc.disable()
            for _ in range(5):
                await one(headers)
            return gc.collect()
        finally:
            gc.enable()
            await app.ctx.aclose()

    assert asyncio.run(run()) == 0
