"""The ASGI app in process: what a failed request leaves behind."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import pytest

from llmrouter.app import create_app
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
