"""The limiter's Redis connection (`accounts/_resp.py`) where Redis misbehaves, under uvloop as
in production: a connection that dies as it is made, a greeting answered and then a hang-up, a
Redis that stops reading, one slow but working, a user with no password, a host no resolver
takes, and commands that would shift the replies. (From an attack review of its first version:
each failed there.)"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import hiredis
import redis.asyncio
import uvloop
from redis.exceptions import RedisError

from llmrouter.accounts import _resp
from llmrouter.accounts._resp import Pipe
from llmrouter.accounts.principal import Principal
from llmrouter.accounts.redis_limits import RedisLimiter
from llmrouter.settings import AccountSettings, Policy
from tests.fakes.limits import Clock, Ledger


async def serve(handler: Any) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server answering every command +OK (greeting included)."""
    while data := await reader.read(65536):
        writer.write(b"+OK\r\n" * data.count(b"*"))
        await writer.drain()


# 1. A connection that dies between being opened and being installed is installed anyway, and
#    (uvloop, as in production) every later batch raises RuntimeError on it, forever.
def test_a_connection_refused_on_accept_does_not_wedge_the_pipe_under_uvloop() -> None:
    conns = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        if conns == 1:  # what Redis does at maxclients (or protected mode): a line, then close
            writer.write(b"-ERR max number of clients reached\r\n")
            await writer.drain()
            writer.close()
            return
        await healthy(reader, writer)

    async def main() -> list[Any]:
        server, port = await serve(handler)
        pipe = Pipe.for_url(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        assert pipe is not None
        got: list[Any] = []
        for _ in range(4):
            try:
                got.append(await pipe.execute([("PING",)]))
            except Exception as exc:
                got.append(exc)
            await asyncio.sleep(0.05)  # the server is healthy again by now
        await pipe.aclose()
        server.close()
        return got

    got = uvloop.run(main())
    assert all(isinstance(g, RedisError) for g in got if isinstance(g, Exception)), got
    assert got[-1] == [b"OK"], got  # made again once the server takes connections
    assert conns >= 2, conns


# 1b. The same through the limiter: fail-open rate limits must admit unchecked, not raise.
def test_the_limiter_fails_open_not_with_a_runtime_error_under_uvloop() -> None:
    conns = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        writer.write(b"-ERR max number of clients reached\r\n")
        await writer.drain()
        writer.close()

    async def main() -> list[str]:
        server, port = await serve(handler)
        lim = RedisLimiter(
            f"redis://127.0.0.1:{port}/0", AccountSettings(), Ledger(), clock=Clock(), socket_timeout=0.3
        )
        principal = Principal(id="p", kind="key", name="t", limits=Policy(rpm=10))
        outcomes = []
        for i in range(3):
            try:
                admission = await lim.admit(principal, f"r{i}", 0)
                outcomes.append(f"admitted counted={admission.counted}")
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
        await lim.aclose()
        server.close()
        return outcomes

    outcomes = uvloop.run(main())
    assert all(o.startswith("admitted") for o in outcomes), outcomes


# 1c. With a greeting (password): a server that answers the greeting then hangs up.
def test_a_greeting_answered_then_a_hang_up_is_a_redis_error_under_uvloop() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b"+OK\r\n")
        await writer.drain()
        writer.close()

    async def main() -> BaseException | None:
        server, port = await serve(handler)
        pipe = Pipe.for_url(f"redis://:pw@127.0.0.1:{port}/0", timeout=0.3)
        assert pipe is not None
        try:
            await pipe.execute([("PING",)])
        except Exception as exc:
            return exc
        finally:
            await pipe.aclose()
            server.close()
        return None

    exc = uvloop.run(main())
    assert isinstance(exc, RedisError), repr(exc)


# 2. A connection given up on (its batch timed out) while Redis is not reading is closed
#    gracefully: it stays open with every command queued on it, and they reach Redis (and run)
#    whenever it reads again. One more such connection a timeout; aclose leaves them too.
def test_a_timed_out_connection_is_closed_not_left_queued() -> None:
    made: list[Any] = []
    lost: list[Any] = []
    orig_made, orig_lost = _resp._Protocol.connection_made, _resp._Protocol.connection_lost

    def cm(self: Any, t: Any) -> None:
        made.append(self)
        orig_made(self, t)

    def cl(self: Any, e: Any) -> None:
        lost.append(self)
        orig_lost(self, e)

    held: list[Any] = []

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # a busy Redis (a long script, a stop): accepts, reads nothing
        await asyncio.sleep(30)

    async def main() -> tuple[int, int, int]:
        server, port = await serve(stalled)
        pipe = Pipe.for_url(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        assert pipe is not None
        batch = [("EVALSHA", "a" * 40, 1, "k", "x" * 2000)] * 256  # a full batch, ~0.5 MB
        for _ in range(3):
            await asyncio.gather(*(pipe.execute(batch) for _ in range(20)), return_exceptions=True)
        await pipe.aclose()
        await asyncio.sleep(0.3)
        queued = sum(p.transport.get_write_buffer_size() for p in made if p not in lost)
        still_open = len(made) - len(lost)
        for w in held:
            w.transport.abort()
        server.close()
        return len(made), still_open, queued

    _resp._Protocol.connection_made, _resp._Protocol.connection_lost = cm, cl  # type: ignore
    try:
        made_n, still_open, queued = uvloop.run(main())
    finally:
        _resp._Protocol.connection_made, _resp._Protocol.connection_lost = orig_made, orig_lost  # type: ignore
    assert (still_open, queued) == (0, 0), (
        f"{made_n} connections made; after aclose {still_open} still open, {queued / 1e6:.1f} MB queued"
    )


# 3. Greeting differs from redis-py's Connection for the same URL.
def _greeting(url_of: Any, use_pipe: bool) -> bytes:
    seen = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            seen.extend(data)
            for part in data.split(b"*")[1:]:
                hello = part.split(b"\r\n")[2:3] == [b"HELLO"]
                writer.write(b"%1\r\n+proto\r\n:3\r\n" if hello else b"+OK\r\n")
            await writer.drain()

    async def main() -> None:
        server, port = await serve(handler)
        url = url_of(port)
        if use_pipe:
            pipe = Pipe.for_url(url, timeout=1)
            assert pipe is not None
            await pipe.execute([("PING",)])
            await pipe.aclose()
        else:
            client = redis.asyncio.Redis.from_url(url)
            await client.ping()
            await client.aclose()
        server.close()

    asyncio.run(main())
    return bytes(seen)


def test_a_username_without_a_password_authenticates_as_redis_py_does() -> None:
    url = lambda port: f"redis://limiter@127.0.0.1:{port}/0"  # noqa: E731
    by_redis_py = _greeting(url, use_pipe=False)
    by_pipe = _greeting(url, use_pipe=True)
    assert b"AUTH" in by_redis_py and b"limiter" in by_redis_py
    assert b"AUTH" in by_pipe, f"redis-py: {by_redis_py!r}\npipe:     {by_pipe!r}"


# 4. A host the resolver refuses with a non-OSError: redis-py says ConnectionError.
def test_a_bad_host_is_a_redis_error() -> None:
    url = "redis://" + "a" * 64 + ".example:6379/0"

    async def main() -> tuple[BaseException, BaseException]:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
        try:
            await client.ping()
        except BaseException as exc:
            by_redis_py = exc
        await client.aclose()
        pipe = Pipe.for_url(url, timeout=1)
        assert pipe is not None
        try:
            await pipe.execute([("PING",)])
        except BaseException as exc:
            by_pipe = exc
        await pipe.aclose()
        return by_redis_py, by_pipe

    by_redis_py, by_pipe = asyncio.run(main())
    assert isinstance(by_redis_py, RedisError), repr(by_redis_py)
    assert isinstance(by_pipe, (RedisError, OSError)), repr(by_pipe)


# 5. An empty batch never ends (count 0 is never reached; the next batch's first reply is
#    then taken by it). _Batch never sends one, but execute() accepts it.
def test_an_empty_execute_returns() -> None:
    redis_url = "redis://127.0.0.1:6379/9"

    async def main() -> Any:
        pipe = Pipe.for_url(redis_url.rsplit("/", 1)[0] + "/9", timeout=0.5)
        assert pipe is not None
        try:
            return await asyncio.wait_for(pipe.execute([]), 2)
        except Exception as exc:
            return exc
        finally:
            await pipe.aclose()

    assert run_result(main) == []


def run_result(main: Any) -> Any:
    return asyncio.run(main())


# 5b. An empty command: Redis answers `*0\r\n` with nothing, so the next batch's reply is taken.
def test_an_empty_command_takes_no_one_elses_reply() -> None:
    async def main() -> tuple[Any, Any]:
        pipe = Pipe.for_url("redis://127.0.0.1:6379/9", timeout=0.5)
        assert pipe is not None
        a, b = await asyncio.gather(
            pipe.execute([()]), pipe.execute([("ECHO", "for b")]), return_exceptions=True
        )
        await pipe.aclose()
        return a, b

    a, b = asyncio.run(main())
    assert a != [b"for b"], f"a got b's reply: a={a!r} b={b!r}"


# 6. In the first version one deadline covered connect, greeting and reply, and a batch that
#    missed it killed the connection for all: with replies 0.3 s late (inside the 0.5 s timeout
#    redis-py applies to a read), the batch that opened each connection missed its deadline and
#    killed it; no batch ever succeeded, while redis-py's pipeline answered every one.
def test_a_slow_but_working_redis_is_usable() -> None:
    pending: set[asyncio.Future[None]] = set()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def later(out: bytes) -> None:
            await asyncio.sleep(0.3)
            writer.write(out)

        while data := await reader.read(65536):
            out = b"".join(
                b"%1\r\n+proto\r\n:3\r\n" if p.split(b"\r\n")[2:3] == [b"HELLO"] else b"+OK\r\n"
                for p in data.split(b"*")[1:]
            )
            answer = asyncio.ensure_future(later(out))
            pending.add(answer)
            answer.add_done_callback(pending.discard)

    async def main() -> list[Any]:
        server, port = await serve(slow)
        pipe = Pipe.for_url(f"redis://:pw@127.0.0.1:{port}/3", timeout=0.5)
        assert pipe is not None
        tasks = []
        for _ in range(40):  # a batch every 50 ms for 2 s
            tasks.append(asyncio.ensure_future(pipe.execute([("PING",)])))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await pipe.aclose()
        server.close()
        return results

    results = uvloop.run(main())
    ok = sum(1 for r in results if r == [b"OK"])
    assert ok >= 30, f"{ok} of {len(results)} answered: {sorted({type(r).__name__ for r in results})}"


# 7. (A second review.) With a db (or password) in the URL, the greeting had its own timeout and
#    the batch another: a Redis that greets slowly and then says nothing cost ~2 x socket_timeout.
def test_a_redis_that_greets_slowly_then_never_answers_costs_one_short_timeout() -> None:
    async def handler(reader, writer):
        data = await reader.read(65536)  # SELECT 9
        await asyncio.sleep(0.45)
        writer.write(b"+OK\r\n" * data.count(b"*"))
        await writer.drain()
        await reader.read(65536)  # the EVALSHA: never answered
        await asyncio.sleep(5)

    async def main() -> float:
        server, port = await serve(handler)
        p = Principal(id="key:rates", kind="key", name="r", limits=Policy(rpm=10))
        lim = RedisLimiter(
            f"redis://127.0.0.1:{port}/9", AccountSettings(), Ledger(), clock=Clock(), socket_timeout=0.5
        )
        started = time.monotonic()
        assert not (await lim.admit(p, "a", 0)).counted
        took = time.monotonic() - started
        await lim.aclose()
        server.close()
        return took

    took = uvloop.run(main())
    assert took < 0.7, f"admit took {took:.2f} s with socket_timeout=0.5"


# 8. After Redis forgets its scripts, each NOSCRIPT run of a batch was run again one after another:
#    with Redis slow but inside the timeout, the k-th caller of a batch waited k round trips.
def test_a_batch_after_noscript_keeps_each_caller_within_a_short_timeout() -> None:
    conns = 0

    async def handler(reader, writer):
        nonlocal conns
        conns += 1
        pipe_conn = conns == 1
        rd = hiredis.Reader()
        while data := await reader.read(65536):
            rd.feed(data)
            while (cmd := rd.gets()) is not False:
                if pipe_conn:
                    writer.write(b"-NOSCRIPT No matching script.\r\n")
                    continue
                await asyncio.sleep(0.3)
                name = cmd[0].upper()
                if name == b"SCRIPT":
                    writer.write(b"$40\r\n" + b"a" * 40 + b"\r\n")
                elif name == b"EVALSHA":
                    writer.write(b"*9\r\n" + b":0\r\n" * 9)
                else:
                    writer.write(b"+OK\r\n")
            await writer.drain()

    async def main() -> list[float]:
        server, port = await serve(handler)
        lim = RedisLimiter(
            f"redis://127.0.0.1:{port}/0", AccountSettings(), Ledger(), clock=Clock(), socket_timeout=0.5
        )
        ps = [Principal(id=f"key:{i}", kind="key", name="r", limits=Policy(rpm=10)) for i in range(8)]
        started = time.monotonic()

        async def one(p):
            with contextlib.suppress(Exception):  # (only the time it took matters here)
                await lim.admit(p, "r" + p.id, 0)
            return time.monotonic() - started

        took = await asyncio.gather(*(one(p) for p in ps))
        await lim.aclose()
        server.close()
        return took

    took = uvloop.run(main())
    assert max(took) < 2.0, [round(t, 1) for t in took]


# 9. Pipe.execute promises redis-py's ConnectionError/TimeoutError; aclose racing a connect
#    made it raise CancelledError in a task nobody cancelled.
def test_aclose_during_a_connect_fails_the_waiter_with_a_redis_error() -> None:
    async def handler(reader, writer):
        await reader.read(65536)
        await asyncio.sleep(0.2)  # slow greeting
        writer.close()

    async def main() -> BaseException | None:
        server, port = await serve(handler)
        pipe = Pipe.for_url(f"redis://127.0.0.1:{port}/9", timeout=0.5)
        waiter = asyncio.ensure_future(pipe.execute([("PING",)]))
        await asyncio.sleep(0.05)
        await pipe.aclose()
        try:
            await waiter
        except BaseException as exc:
            return exc
        finally:
            server.close()
        return None

    exc = uvloop.run(main())
    assert isinstance(exc, RedisError), repr(exc)
