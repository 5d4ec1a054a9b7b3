"""Deployment health shared by replicas through a real Redis on 127.0.0.1:6379: each test runs
two or three `SharedHealth`s (separate clients, as separate processes would have) on a channel of
its own, and deletes what it stored."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import redis

from llmrouter.routing.health import LocalHealth
from llmrouter.routing.shared_health import SharedHealth
from llmrouter.settings import HealthSettings

REDIS_URL = "redis://127.0.0.1:6379"
UNREACHABLE_URL = "redis://127.0.0.1:1"


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def channel() -> Iterator[str]:
    if not _reachable(6379):
        message = "no Redis on 127.0.0.1:6379 (start one: redis-server --port 6379 --save '')"
        if os.environ.get("CI") or os.environ.get("LLMROUTER_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    name = f"llmrouter:test:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(match=f"{name}*"):
            client.delete(key)
    finally:
        client.close()


def replica(channel: str, url: str = REDIS_URL, **settings: float) -> SharedHealth:
    health = HealthSettings(**{"consecutive_failures": 2, "cooldown_seconds": 5.0, **settings})  # type: ignore[arg-type]
    return SharedHealth(LocalHealth(health), url, channel=channel)


@asynccontextmanager
async def started(*books: SharedHealth) -> AsyncIterator[None]:
    try:
        for book in books:
            await book.start()
            assert book.connected
        yield
    finally:
        for book in books:
            await book.aclose()


async def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Polls `condition` until it holds; returns how long that took, failing after `seconds`."""
    begun = time.monotonic()
    while not condition():
        assert time.monotonic() - begun < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - begun


def eject(book: SharedHealth, label: str) -> None:
    for _ in range(2):  # consecutive_failures=2
        book.record(label, False)
    assert not book.available(label)


def test_an_ejection_reaches_the_other_replica_within_a_second(channel: str) -> None:
    async def scenario() -> None:
        a, b = replica(channel), replica(channel)
        async with started(a, b):
            assert b.available("p/x")
            eject(a, "p/x")
            assert await within(1.0, lambda: not b.available("p/x")) < 1.0
            assert 4.0 < b.unavailable_for("p/x") <= 5.0  # out for the cooldown a chose
            assert b.retry_after_for("p/x") == 0  # an ejection, not a Retry-After
            assert b.available("p/other")  # only that deployment

    asyncio.run(scenario())


def test_a_retry_after_reaches_the_other_replica_within_a_second(channel: str) -> None:
    async def scenario() -> None:
        a, b = replica(channel), replica(channel)
        async with started(a, b):
            a.skip_for("p/x", 30)
            assert await within(1.0, lambda: not b.available("p/x")) < 1.0
            assert 28.0 < b.retry_after_for("p/x") <= 30.0

    asyncio.run(scenario())


def test_a_replica_started_later_learns_what_is_still_in_force(channel: str) -> None:
    async def scenario() -> None:
        a, b = replica(channel), replica(channel)
        async with started(a, b):
            eject(a, "p/x")
            a.skip_for("p/y", 30)
            await within(1.0, lambda: not b.available("p/x") and not b.available("p/y"))
            a.skip_for("p/y", 1)  # an earlier end than the one stored: the later one stays
            await asyncio.sleep(0.3)
            c = replica(channel)
            async with started(c):  # nothing is published after it subscribes
                assert not c.available("p/x")
                assert 3.0 < c.unavailable_for("p/x") <= 5.0
                assert c.retry_after_for("p/x") == 0
                assert 25.0 < c.retry_after_for("p/y") <= 30.0
                assert c.available("p/z")

    asyncio.run(scenario())


def test_after_a_remote_ejection_one_probe_and_the_cooldown_ladder_is_shared(channel: str) -> None:
    async def scenario() -> None:
        a, b = replica(channel, cooldown_seconds=0.5), replica(channel, cooldown_seconds=0.5)
        async with started(a, b):
            eject(a, "p/x")
            await within(1.0, lambda: not b.available("p/x"))
            await within(1.0, lambda: b.available("p/x"))  # a's cooldown is over
            b.claim("p/x")  # the probe
            assert not b.available("p/x")  # only one at a time
            b.record("p/x", False)  # it failed: the next step of a's ladder, not a second first
            assert 0.9 < b.unavailable_for("p/x") <= 1.0
            await within(1.0, lambda: a.unavailable_for("p/x") > 0.5)  # and a hears of it
            await within(1.5, lambda: b.available("p/x"))
            b.claim("p/x")
            b.record("p/x", True)  # the probe came back well: full traffic
            for _ in range(5):
                assert b.available("p/x")
                b.claim("p/x")

    asyncio.run(scenario())


def test_a_replica_ignores_events_that_carry_its_own_id(channel: str) -> None:
    async def scenario() -> None:
        a, b = replica(channel), replica(channel)
        async with started(a, b):
            publisher = redis.Redis.from_url(REDIS_URL)
            event = {
                "label": "p/x",
                "kind": "eject",
                "until": time.time() + 60,
                "ejections": 1,
                "origin": a.replica_id,
            }
            publisher.publish(channel, json.dumps(event))
            publisher.close()
            await within(1.0, lambda: not b.available("p/x"))  # it was delivered...
            await asyncio.sleep(0.1)
            assert a.available("p/x")  # ...and a, whose id it carries, did not take it

    asyncio.run(scenario())


def test_a_malformed_event_is_logged_and_the_next_one_still_applies(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        a, b = replica(channel), replica(channel)
        async with started(a, b):
            publisher = redis.Redis.from_url(REDIS_URL)
            publisher.publish(channel, b'{"label": "p/x", "kind": "nonsense"}')
            publisher.close()
            a.skip_for("p/x", 10)
            await within(1.0, lambda: not b.available("p/x"))

    with caplog.at_level(logging.WARNING, logger="llmrouter.health"):
        asyncio.run(scenario())
    assert any("malformed health event" in r.getMessage() for r in caplog.records)


def test_without_redis_start_returns_at_once_and_health_stays_local(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        book = replica("llmrouter:test:unreachable", UNREACHABLE_URL)
        begun = time.monotonic()
        await book.start()
        assert time.monotonic() - begun < 1.0
        assert not book.connected
        eject(book, "p/x")  # the local behaviour, without an exception from the failed telling
        assert 4.0 < book.unavailable_for("p/x") <= 5.0
        book.skip_for("p/y", 3)
        assert 2.0 < book.retry_after_for("p/y") <= 3.0
        await asyncio.sleep(0.1)  # the attempts to tell the others fail, and are logged
        begun = time.monotonic()
        await book.aclose()
        assert time.monotonic() - begun < 1.0

    with caplog.at_level(logging.WARNING, logger="llmrouter.health"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "llmrouter.health"]
    assert any("local to this replica" in m for m in messages)
    assert any("could not share the eject of p/x" in m for m in messages)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_replica_that_started_without_redis_joins_when_it_comes_up() -> None:
    server_binary = shutil.which("redis-server")
    if server_binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    url = f"redis://127.0.0.1:{port}"

    async def scenario() -> None:
        a = replica("llmrouter:test:late", url)
        await a.start()
        assert not a.connected
        server = subprocess.Popen(
            [
                server_binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            await within(5.0, lambda: _reachable(port))
            b = replica("llmrouter:test:late", url)
            async with started(b):
                eject(b, "p/x")
                # a's next attempt (backoff: under 0.5 s, 1 s, 2 s...) loads or hears it
                await within(5.0, lambda: not a.available("p/x"))
                assert a.connected
        finally:
            await a.aclose()
            server.terminate()
            server.wait(timeout=5)

    asyncio.run(scenario())
