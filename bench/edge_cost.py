"""The connection protocol's own cost per request, in process: uvicorn's httptools protocol beside
llmrouter's EdgeProtocol (api/protocol.py), on one keep-alive connection with a fake transport and
an ASGI app that answers at once, so that nothing but the protocol differs.

    .venv/bin/python bench/edge_cost.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from llmrouter.api.protocol import EdgeProtocol
from llmrouter.settings import ServerSettings

BODY = b'{"model": "mock/model", "prompt": "Say hi", "max_tokens": 16}'
REQUEST = (
    b"POST /api/v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Authorization: Bearer sk-0123456789abcdef0123456789\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def per_request(factory: Callable[..., Any], n: int) -> float:
    config = Config(app=app, lifespan="off", access_log=False, log_config=None)
    config.load()
    protocol = factory(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(Transport())
    for _ in range(200):
        protocol.data_received(REQUEST)
        await asyncio.sleep(0)
    started = time.perf_counter()
    for _ in range(n):
        protocol.data_received(REQUEST)
        await asyncio.sleep(0)  # the request's task runs and answers
        await asyncio.sleep(0)
    return (time.perf_counter() - started) / n * 1e6


async def main(requests: int, rounds: int) -> None:
    edge = functools.partial(EdgeProtocol, server=ServerSettings())
    for _ in range(rounds):
        plain = await per_request(HttpToolsProtocol, requests)
        bounded = await per_request(edge, requests)
        print(
            f"uvicorn {plain:.2f} us, EdgeProtocol {bounded:.2f} us: +{bounded - plain:.2f} us a request"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    uvloop.install()
    asyncio.run(main(args.requests, args.rounds))
