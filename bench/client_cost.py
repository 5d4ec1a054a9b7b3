"""What one upstream exchange costs the router's process: aiohttp as llmrouter used it until
issue 16's eighth step, beside the transport it uses now (`providers/_client.py`).

    .venv/bin/python bench/client_cost.py [--requests 5000] [--concurrency 1,16]

Both POST the same small completion request to `bench/mock_upstream.py` (started here, in a
process of its own) and read its answer whole; the figure is this process's CPU time (user +
system) per exchange, after a warm-up, and the wall time per exchange beside it. aiohttp is set
up as `AiohttpTransport` was (a pooled `TCPConnector`, a session timeout, `auto_decompress`, the
request under `asyncio.timeout`), so the difference is the client's own.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmrouter.providers import _http
from llmrouter.settings import Timeouts
from run import free_port, mock_upstream

BODY = b'{"model":"mock-model","prompt":"Say hello","max_tokens":16}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer x"}


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    exchange: Callable[[], Awaitable[bytes]], n: int, concurrency: int
) -> tuple[float, float]:
    for _ in range(200):
        await exchange()

    async def worker(count: int) -> None:
        for _ in range(count):
            await exchange()

    c0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return (cpu() - c0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


async def aiohttp_client(url: str, n: int, concurrency: int) -> tuple[float, float]:
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=600, sock_connect=5),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )

    async def exchange() -> bytes:
        async with asyncio.timeout(60):
            response = await session.request(
                "POST", url, data=BODY, headers=HEADERS, allow_redirects=False
            )
        try:
            return await response.read()
        finally:
            response.release()

    try:
        return await measure(exchange, n, concurrency)
    finally:
        await session.close()


async def our_client(url: str, n: int, concurrency: int) -> tuple[float, float]:
    transport = _http.HttpTransport("mock", max_connections=256)
    await transport.start()
    request = _http.Request("POST", url, BODY, HEADERS)
    timeouts = Timeouts()

    async def exchange() -> bytes:
        response = await transport.send(request, timeouts)
        return await _http.read_whole(response, lambda r, b: RuntimeError(r.status))

    try:
        return await measure(exchange, n, concurrency)
    finally:
        await transport.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/completions"
    with mock_upstream(port, 600, Path("/dev/null")):
        print("| client | at once | CPU µs/exchange (median of rounds) | wall µs/exchange |")
        print("|---|---:|---:|---:|")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for name, client in (
                ("aiohttp (as AiohttpTransport)", aiohttp_client),
                ("_client", our_client),
            ):
                runs = sorted(
                    uvloop.run(client(url, args.requests, concurrency)) for _ in range(args.rounds)
                )
                cpu_us, wall_us = runs[len(runs) // 2]
                print(f"| {name} | {concurrency} | {cpu_us:.1f} | {wall_us:.1f} |")


if __name__ == "__main__":
    main()
