"""A stream's chunks (`api/sse.py`): each event encodes only its choices after a prefix encoded
once, and every event is exactly what encoding the whole chunk gives."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from msgspec import UNSET

from llmrouter.api.chat import CHAT
from llmrouter.api.completions import COMPLETIONS
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
