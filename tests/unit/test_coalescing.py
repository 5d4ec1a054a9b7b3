"""The edge's coalescing transport: fewer writes, never a byte held that a client waits for."""

from __future__ import annotations

import asyncio
from typing import Any

from llmrouter.api.protocol import _Coalescing

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recording:
    """A transport that records each write (one system call each, for a real one)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def run(body: Any) -> None:
    async def main() -> None:
        real = Recording()
        await body(real, _Coalescing(real, asyncio.get_running_loop()))  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_head_goes_out_with_its_body_in_one_write() -> None:
    async def body(real: Recording, t: _Coalescing) -> None:
        t.write(HEAD)
        assert real.writes == []  # held for its body...
        t.write(b"hi")
        assert real.writes == [HEAD + b"hi"]  # ...which is not held at all
        await asyncio.sleep(0)
        assert real.writes == [HEAD + b"hi"]

    run(body)


def test_a_burst_of_parts_is_one_write_after_the_first() -> None:
    async def body(real: Recording, t: _Coalescing) -> None:
        t.write(HEAD)
        t.write(b"part 1")  # a stream's first token: at once
        for n in range(2, 6):
            t.write(b"part %d" % n)
        assert real.writes == [HEAD + b"part 1"]
        await asyncio.sleep(0)  # the end of this turn of the loop
        assert real.writes == [HEAD + b"part 1", b"part 2part 3part 4part 5"]
        await asyncio.sleep(0)
        t.write(b"later")  # a part that comes on its own (a new turn) goes at once
        assert real.writes[-1] == b"later"

    run(body)


def test_a_head_without_a_body_goes_at_the_end_of_the_turn() -> None:
    async def body(real: Recording, t: _Coalescing) -> None:
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert real.writes == []
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]

    run(body)


def test_close_writes_what_is_held_and_abort_drops_it() -> None:
    async def body(real: Recording, t: _Coalescing) -> None:
        t.write(b"a")
        t.write(b"b")  # held (same turn)
        t.close()
        assert real.writes == [b"a", b"b"] and real.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing, writes nothing
        assert real.writes == [b"a", b"b"]

    run(body)

    async def aborting(real: Recording, t: _Coalescing) -> None:
        t.write(b"a")
        t.write(b"b")
        t.abort()
        await asyncio.sleep(0)
        assert real.writes == [b"a"] and real.aborted

    run(aborting)


def test_write_eof_flushes_first_and_other_calls_reach_the_real_transport() -> None:
    async def body(real: Recording, t: _Coalescing) -> None:
        t.write(b"x")
        t.write(b"y")
        assert t.get_write_buffer_size() == 1  # what is held counts as buffered
        await asyncio.sleep(0)
        t.write(HEAD)
        t.write_eof()
        assert real.writes == [b"x", b"y", HEAD] and real.eof
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)

    run(body)


def test_what_a_handler_writes_after_our_side_ended_is_dropped() -> None:
    """After `write_eof` (an answer that said the connection ends), a write would raise from the
    real transport, and did, in a handler pipelined behind that answer: it is dropped."""

    async def body(real: Recording, t: _Coalescing) -> None:
        t.write(HEAD)
        t.write_eof()
        t.write(b"late")
        t.write(b"later")
        await asyncio.sleep(0)
        t.close()
        assert real.writes == [HEAD] and real.eof

    run(body)
