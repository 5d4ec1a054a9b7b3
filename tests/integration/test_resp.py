"""The limiter's pipelined Redis connection (`accounts/_resp.py`), against the real Redis and
against servers on loopback that misbehave: commands spelled as redis-py spells them, replies
matched in order across batches on one connection, error replies in their place, and a broken
or silent connection failing what waits on it and made again for the next."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmrouter.accounts._resp import Pipe, packed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def test_commands_are_spelled_as_redis_py_spells_them() -> None:
    command = ("EVALSHA", "ab" * 20, 2, "k:é", b"\x00raw", 17, -3, 1.5, 1796170000.123456, "")
    assert packed(command) == b"".join(Connection().pack_command(*command))
    for bad in (("SET", "k", True), ("SET", "k", None), ()):
        with pytest.raises(DataError):  # (a RedisError: the limiter fails open or closed on it)
            packed(bad)


@pytest.mark.parametrize(
    ("url", "served"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://:secret@example.com:6380/3", True),
        ("redis://user:secret@example.com", True),
        ("rediss://example.com:6380/0", False),  # TLS: redis-py's pipeline
        ("unix:///run/redis.sock?db=2", False),
        ("redis://example.com?socket_keepalive=true", False),
    ],
)
def test_only_plain_urls_are_served_here(url: str, served: bool) -> None:
    assert (Pipe.for_url(url, timeout=0.5) is not None) == served


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


def test_replies_come_in_order_to_each_batch_with_errors_in_their_place(redis_url: str) -> None:
    async def main() -> None:
        pipe = Pipe.for_url(redis_url, timeout=2)
        assert pipe is not None
        key = f"resp-test:{uuid.uuid4().hex}"
        try:
            batches = await asyncio.gather(
                *(pipe.execute([("INCR", key), ("INCR", key), ("GET", key)]) for _ in range(50))
            )
            counts = [reply for batch in batches for reply in batch[:2]]
            assert sorted(counts) == list(range(1, 101))  # each INCR once, none lost or doubled
            for first, second, got in batches:
                assert second == first + 1 and got == str(second).encode()  # a batch in order
            mixed = await pipe.execute([("HGET", key, "f"), ("GET", key), ("EVALSHA", "0" * 40, 0)])
            assert isinstance(mixed[0], ResponseError) and "WRONGTYPE" in str(mixed[0])
            assert mixed[1] == b"100"
            assert isinstance(mixed[2], NoScriptError)
        finally:
            await pipe.execute([("DEL", key)])
            await pipe.aclose()

    run(main)


def test_a_url_s_database_is_selected(redis_url: str) -> None:
    async def main() -> bytes | None:
        base = redis_url.rsplit("/", 1)[0]
        pipe = Pipe.for_url(f"{base}/5", timeout=2)
        assert pipe is not None
        key = f"resp-test:{uuid.uuid4().hex}"
        await pipe.execute([("SET", key, "in five")])
        await pipe.aclose()
        other = redis.asyncio.Redis.from_url(f"{base}/5")
        try:
            value = await other.get(key)
            await other.delete(key)
            assert await redis.asyncio.Redis.from_url(f"{base}/0").get(key) is None
            return value
        finally:
            await other.aclose()

    assert run(main) == b"in five"


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"


def test_a_refused_greeting_is_a_connection_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b"-WRONGPASS invalid username-password pair\r\n")
        await writer.drain()
        await reader.read(1000)

    async def main() -> None:
        server, url = await serve(handler)
        pipe = Pipe.for_url(url.replace("redis://", "redis://:nope@"), timeout=1)
        assert pipe is not None
        with pytest.raises(RedisConnectionError, match="refused"):
            await pipe.execute([("GET", "k")])
        await pipe.aclose()
        server.close()

    run(main)


def test_a_connection_cut_mid_reply_fails_its_batch_and_the_next_connects_again() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read(1000)
        if connections == 1:
            writer.write(b"*2\r\n:1\r\n")  # half an answer, then the connection goes
            await writer.drain()
            writer.close()
            return
        writer.write(b":7\r\n")
        await writer.drain()
        await reader.read(1000)

    async def main() -> list[Any]:
        server, url = await serve(handler)
        pipe = Pipe.for_url(url, timeout=1)
        assert pipe is not None
        with pytest.raises(RedisConnectionError):
            await pipe.execute([("EVALSHA", "x", 0)])
        again = await pipe.execute([("INCR", "k")])
        await pipe.aclose()
        server.close()
        return again

    assert run(main) == [7]
    assert connections == 2


def test_a_silent_server_costs_one_timeout_and_fails_every_batch_waiting() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # reads nothing, answers nothing

    async def main() -> tuple[list[Any], float]:
        server, url = await serve(handler)
        pipe = Pipe.for_url(url, timeout=0.2)
        assert pipe is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(pipe.execute([("GET", "k")]) for _ in range(3)), return_exceptions=True
        )
        took = loop.time() - started
        await pipe.aclose()
        server.close()
        return results, took

    results, took = run(main)
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert took < 1.0


def test_an_answer_nobody_asked_for_breaks_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b":1\r\n:2\r\n")  # two answers to one command: out of step
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> list[Any] | BaseException:
        server, url = await serve(handler)
        pipe = Pipe.for_url(url, timeout=1)
        assert pipe is not None
        first = await pipe.execute([("GET", "k")])
        await asyncio.sleep(0.05)
        assert pipe._conn is None  # dropped: what it says next could be taken for a reply
        await pipe.aclose()
        server.close()
        return first

    assert run(main) == [1]
