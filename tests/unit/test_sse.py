"""A stream's chunks (`api/sse.py`): each event encodes only its choices after a prefix encoded
once, and every event is exactly what encoding the whole chunk gives; and the comments that keep
a stream's connection open while it waits for its first token."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from msgspec import UNSET

from llmrouter.api.chat import CHAT
from llmrouter.api.completions import COMPLETIONS
from llmrouter.api.sse import Keepalive
from llmrouter.providers.base import StreamPart
from llmrouter.wire.completions import ChunkChoice, Usage


def target(model: str, provider: str) -> Any:
    return SimpleNamespace(
        model=SimpleNamespace(id=model), deployment=SimpleNamespace(provider=provider)
    )


def events(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n\n")
    out = []
    for event in body[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ")
        out.append(msgspec.json.decode(event[6:]))
    return out


PARTS = [
    StreamPart([ChunkChoice("Hel", 0)]),
    StreamPart([ChunkChoice("lo", 0), ChunkChoice("Hi", 1)], system_fingerprint="fp_1"),
    StreamPart([ChunkChoice(' "choices":[] ', 0)], system_fingerprint="fp_1"),
    StreamPart([ChunkChoice("", 0, None, "stop", "eos")], system_fingerprint="fp_2"),
    StreamPart([ChunkChoice("!", 1, None, "length", "length")]),
]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("model", ["m", 'a "choices":[] model', "é\\\u2028"])
def test_each_event_is_the_whole_chunk_encoded(include_usage: bool, model: str) -> None:
    chunks = COMPLETIONS.chunks("cmpl-1", target(model, "p"), include_usage)
    got = events(chunks.parts(PARTS[:2]) + chunks.parts(PARTS[2:]))
    assert len(got) == len(PARTS)
    for event, part in zip(got, PARTS, strict=True):
        assert event["id"] == "cmpl-1" and event["model"] == model and event["provider"] == "p"
        assert event["object"] == "text_completion"
        assert event.get("system_fingerprint", UNSET) == part.system_fingerprint
        assert [c["text"] for c in event["choices"]] == [c.text for c in part.choices]
        assert [c["finish_reason"] for c in event["choices"]] == [c.finish_reason for c in part.choices]
        if include_usage:
            assert event["usage"] is None
        else:
            assert "usage" not in event
    if not include_usage:
        assert chunks.usage(Usage(1, 2, 3)) == b""
    else:
        (last,) = events(chunks.usage(Usage(1, 2, 3)))
        assert last["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        assert last["choices"] == []


def test_an_event_is_byte_for_byte_the_chunk_s_encoding() -> None:
    from llmrouter.wire.completions import CompletionChunk, encoder

    chunks = COMPLETIONS.chunks("cmpl-1", target("m", "p"), True)
    created = chunks._chunk.created
    for part in PARTS:
        whole = CompletionChunk(
            id="cmpl-1",
            created=created,
            model="m",
            provider="p",
            system_fingerprint=part.system_fingerprint,
            choices=part.choices,
            usage=None,
        )
        assert chunks.parts([part]) == b"data: " + encoder.encode(whole) + b"\n\n"


def test_a_retargeted_stream_names_its_new_model_and_provider() -> None:
    chunks = COMPLETIONS.chunks("cmpl-1", target("m", "p"), False)
    assert events(chunks.parts(PARTS[:1]))[0]["provider"] == "p"
    chunks.retarget(target("m2", "q"))
    (event,) = events(chunks.parts(PARTS[:1]))
    assert (event["model"], event["provider"]) == ("m2", "q")


def test_chat_chunks_carry_the_role_first_and_the_same_frame() -> None:
    chunks = CHAT.chunks("chatcmpl-1", target("m", "p"), False)
    got = events(chunks.parts(PARTS))
    assert [e["object"] for e in got] == ["chat.completion.chunk"] * len(PARTS)
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert got[1]["system_fingerprint"] == "fp_1" and "system_fingerprint" not in got[0]
    assert got[3]["choices"][0]["finish_reason"] == "stop"


# -- comments while a stream waits for its first token -------------------------------------------


class Client:
    """A stream's ASGI send. When `paused` (the client has not read what came before on its
    connection), a send waits, as uvicorn's does in its flow control, before writing anything."""

    def __init__(self, *, paused: bool = False, fail: bool = False) -> None:
        self.writable = asyncio.Event()
        if not paused:
            self.writable.set()
        self.fail = fail
        self.written: list[str] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        await self.writable.wait()
        if self.fail:
            raise ConnectionResetError("the client left")
        self.written.append(message["type"])


def test_a_first_token_in_time_sends_nothing_and_makes_no_task() -> None:
    async def main() -> tuple[bool, list[str], bool]:
        client = Client()
        keepalive = Keepalive(client, [], 0.05)
        await asyncio.sleep(0.01)
        started = await keepalive.stop()
        await asyncio.sleep(0.08)  # (the timer is gone too)
        return started, client.written, keepalive._task is None

    assert asyncio.run(main()) == (False, [], True)


def test_a_slow_first_token_gets_the_start_and_a_comment_a_period() -> None:
    async def main() -> tuple[bool, list[str]]:
        client = Client()
        keepalive = Keepalive(client, [], 0.02)
        await asyncio.sleep(0.07)
        return await keepalive.stop(), client.written

    started, written = asyncio.run(main())
    assert started
    assert written[0] == "http.response.start" and len(written) >= 3
    assert written[1:] == ["http.response.body"] * (len(written) - 1)


def test_a_start_under_way_is_sent_whole_before_stop_says_it_was() -> None:
    """The first token comes while the start waits for a slow client: `stop()` waits for it,
    rather than cut it off and say it was sent (the stream's body would then go out with no
    start, and the client would get a 500)."""

    async def main() -> tuple[bool, list[str]]:
        client = Client(paused=True)
        keepalive = Keepalive(client, [], 0.01)
        await asyncio.sleep(0.03)  # the first comment is due: its start waits for the client
        asyncio.get_running_loop().call_later(0.05, client.writable.set)
        return await keepalive.stop(), client.written

    assert asyncio.run(main()) == (True, ["http.response.start", "http.response.body"])


def test_a_failed_comment_cancels_the_wait_and_stop_raises_the_failure() -> None:
    async def main() -> tuple[str, int]:
        client = Client(fail=True)
        keepalive = Keepalive(client, [], 0.01)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)  # the wait for the first token: cancelled by the failure
        try:
            await keepalive.stop()
        except ConnectionResetError as exc:
            task = asyncio.current_task()
            assert task is not None
            return str(exc), task.cancelling()
        return "no failure", -1

    assert asyncio.run(main()) == ("the client left", 0)
