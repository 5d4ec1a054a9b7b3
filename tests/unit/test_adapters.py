"""Each HTTP adapter as a translation, in process, against a `MockTransport` playing its upstream:
what it sends, and how it reads answers, streams and errors. (The fakes in tests/fakes, checked
by each provider's official SDK, carry the same wire formats over real sockets.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from llmrouter.errors import (
    ContextLengthExceeded,
    LlmrouterError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)
from llmrouter.generation import Generation, Message, from_completions
from llmrouter.providers import _http
from llmrouter.providers._schemas import anthropic_problem, gemini_problem, openai_strict_problem
from llmrouter.providers.anthropic import AnthropicAdapter
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.providers.gemini import GeminiAdapter
from llmrouter.providers.openai_chat import OpenAIChatAdapter
from llmrouter.settings import (
    AnthropicProvider,
    CheckSettings,
    ConfigError,
    DeploymentSettings,
    GeminiProvider,
    ModelSettings,
    OpenAIChatProvider,
    Timeouts,
)
from llmrouter.wire.chat import ReasoningRequest
from llmrouter.wire.validate import decode_completion_request

KEY = "sk-test-key-0123456789"
MODEL = ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="m")])
Reply = _http.MockResponse | Callable[[_http.Request], _http.MockResponse]


def adapter(kind: type[Any], settings: Any, *replies: Reply) -> tuple[Any, _http.MockTransport]:
    queue = list(replies)

    async def handler(request: _http.Request) -> _http.MockResponse:
        reply = queue.pop(0)
        return reply(request) if callable(reply) else reply

    transport = _http.MockTransport(handler, name="p")
    made = kind("p", settings, [], CheckSettings(), transport)
    asyncio.run(made.start())
    return made, transport


def call(model: str = "m", **body: Any) -> Call:
    _, request = from_completions(
        *decode_completion_request(msgspec.json.encode({"prompt": "Hi", **body}))
    )
    return Call(DeploymentSettings(provider="p", model=model), request, Timeouts(first_token=2, idle=2))


def sent(transport: _http.MockTransport, i: int = -1) -> dict[str, Any]:
    body = transport.requests[i].body
    assert body is not None
    result: dict[str, Any] = json.loads(body)
    return result


def complete(a: Any, c: Call) -> Completion:
    result: Completion = asyncio.run(a.complete(c))
    return result


def stream(a: Any, c: Call) -> list[StreamPart]:
    """A streamed answer's parts, its batches (never empty) one after another."""

    async def run() -> list[StreamPart]:
        batches: AsyncIterator[list[StreamPart]] = a.stream(c)
        return [p async for batch in batches for p in nonempty(batch)]

    return asyncio.run(run())


def nonempty(batch: list[StreamPart]) -> list[StreamPart]:
    assert batch, "a stream yields no empty batch"
    return batch


def sse(*events: dict[str, Any] | str, named: bool = False, done: bool = False) -> bytes:
    out = b""
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e)
        if named:
            assert isinstance(e, dict)
            out += f"event: {e['type']}\n".encode()
        out += f"data: {data}\n\n".encode()
    return out + (b"data: [DONE]\n\n" if done else b"")


def ok(body: dict[str, Any] | bytes, status: int = 200, **headers: str) -> _http.MockResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _http.MockResponse(status, [raw], headers)


# -- openai_chat ----------------------------------------------------------------------------------

CHAT = OpenAIChatProvider(base_url="http://up/v1", api_key=KEY)


def chat_answer(**message: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}
    return {
        "choices": [choice],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_openai_chat_sends_the_prompt_as_one_user_message_with_every_parameter() -> None:
    a, t = adapter(OpenAIChatAdapter, CHAT, ok(chat_answer(content="")))  # (what it sends)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    body = {"n": 2, "seed": 7, "temperature": 0.5, "top_p": 0.9, "logit_bias": {"11": -100}}
    body |= {"stop": "\n", "logprobs": 3, "frequency_penalty": 1, "presence_penalty": -1}
    complete(a, call("gpt-x", **body, response_format=fmt, user="u1"))
    req = t.requests[0]
    assert req.url == "http://up/v1/chat/completions" and req.headers["authorization"] == f"Bearer {KEY}"
    assert sent(t) == {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": "Hi"}],
        "n": 2,
        "seed": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "logit_bias": {"11": -100},
        "frequency_penalty": 1,
        "presence_penalty": -1,
        "stop": ["\n"],
        "max_completion_tokens": 16,  # the Completions API's default, sent
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": fmt,
    }  # `user` stays with the router unless `forward` says


def test_openai_chat_output_cap_field_null_and_forwarded_user() -> None:
    settings = msgspec.structs.replace(CHAT, max_tokens_field="max_tokens", forward=frozenset({"user"}))
    a, t = adapter(OpenAIChatAdapter, settings, ok(chat_answer(content="")), ok(chat_answer(content="")))
    complete(a, call(max_tokens=5, user="u1"))
    assert sent(t)["max_tokens"] == 5 and sent(t)["user"] == "u1"
    complete(a, call(max_tokens=None))
    assert "max_tokens" not in sent(t) and "max_completion_tokens" not in sent(t)  # no limit


def test_openai_chat_logprobs_become_the_completions_shape_with_character_offsets() -> None:
    tokens = [
        {
            "token": "H",
            "logprob": -0.1,
            "bytes": [72],
            "top_logprobs": [{"token": "H", "logprob": -0.1}],
        },
        {"token": "\\xc3", "logprob": -0.2, "bytes": [195], "top_logprobs": []},
        {"token": "\\xa9", "logprob": -0.3, "bytes": [169], "top_logprobs": []},
        {"token": "!", "logprob": -0.4, "bytes": [33], "top_logprobs": []},
    ]
    answer = chat_answer(content="Hé!", reasoning_content="hmm")
    answer["choices"][0]["logprobs"] = {"content": tokens}
    a, _ = adapter(OpenAIChatAdapter, CHAT, ok(answer))
    choice = complete(a, call(logprobs=1)).choices[0]
    assert choice.text == "Hé!" and choice.reasoning == "hmm"
    assert choice.logprobs is not None
    # a token ending inside a character spells nothing; the one that ends it spells all of it
    assert choice.logprobs.tokens == ["H", "", "é", "!"]
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [0, 1, 1, 2]
    assert choice.logprobs.token_logprobs == [-0.1, -0.2, -0.3, -0.4]
    assert choice.logprobs.top_logprobs == [{"H": -0.1}, {}, {}, {}]


def test_openai_chat_streams_deltas_then_usage_and_fails_without_done() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"reasoning": "think"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    ]
    a, t = adapter(OpenAIChatAdapter, CHAT, ok(sse(*chunks, done=True)), ok(sse(*chunks)))
    parts = stream(a, call(stream=True))
    assert sent(t)["stream"] is True and sent(t)["stream_options"] == {"include_usage": True}
    assert "".join(c.text for p in parts for c in p.choices) == "Hello"
    assert [c.reasoning for p in parts for c in p.choices if c.reasoning] == ["think"]
    last = [c for p in parts for c in p.choices][-1]
    assert (last.finish_reason, last.native_finish_reason) == ("length", "length")
    assert parts[-1].usage is not None and parts[-1].usage.prompt_tokens == 4
    with pytest.raises(UpstreamUnavailable, match="ended the stream"):
        stream(a, call(stream=True))


def test_openai_chat_in_band_errors_refusals_and_statuses() -> None:
    error = {"error": {"message": f"boom {KEY}", "type": "server_error"}}
    refusal = chat_answer(content=None, refusal="I can't help with that.")
    too_long = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    a, _ = adapter(
        OpenAIChatAdapter,
        CHAT,
        ok(sse({"choices": []}, error)),
        ok(refusal),
        ok(too_long, 400),
        ok({"error": {"message": "slow"}}, 429, **{"Retry-After": "3"}),
    )
    with pytest.raises(UpstreamUnavailable, match="reported an error: boom") as caught:
        stream(a, call(stream=True))
    assert KEY not in caught.value.message
    choice = complete(a, call()).choices[0]
    assert (choice.text, choice.finish_reason, choice.native_finish_reason) == (
        "I can't help with that.", "content_filter", "stop"
    )  # fmt: skip
    with pytest.raises(ContextLengthExceeded):
        complete(a, call())
    with pytest.raises(UpstreamRateLimited) as limited:
        complete(a, call())
    assert limited.value.retry_after == 3


def test_openai_strict_schemas_are_held_to_its_subset() -> None:
    closed = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    closed["additionalProperties"] = False
    assert openai_strict_problem(closed, True) is None
    assert (
        openai_strict_problem({**closed, "required": []}, True)
        == "strict mode needs every property required"
    )
    assert "additionalProperties" in (
        openai_strict_problem({"type": "object", "properties": {}}, True) or ""
    )
    nested = {**closed, "properties": {"a": {"type": "array", "items": {"type": "string", "not": {}}}}}
    assert openai_strict_problem(nested, True) == "strict mode has no `not`"
    assert openai_strict_problem({"type": "object"}, False) is None  # not strict: taken as it is
    named_not = {**closed, "properties": {"not": {"type": "string"}}, "required": ["not"]}
    assert openai_strict_problem(named_not, True) is None  # a property called `not` is no keyword


# -- anthropic ------------------------------------------------------------------------------------

CLAUDE = AnthropicProvider(base_url="http://up", api_key=KEY, max_output_tokens=1000)


def message(*blocks: dict[str, Any], stop: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": list(blocks),
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 3, **usage},
    }


def test_anthropic_always_sends_max_tokens_and_its_version_and_key_headers() -> None:
    text = {"type": "text", "text": "yo"}
    a, t = adapter(AnthropicAdapter, CLAUDE, *(ok(message(text)) for _ in range(3)))
    complete(a, call("claude", temperature=0.5, top_p=0.9, stop=["\n", "END"], user="u1"))
    req = t.requests[0]
    assert req.url == "http://up/v1/messages"
    assert req.headers["x-api-key"] == KEY and req.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in req.headers
    assert sent(t) == {
        "model": "claude",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 16,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["\n", "END"],
    }
    complete(a, call(max_tokens=None))
    assert sent(t)["max_tokens"] == 1000  # null: the configured cap
    forwarding = msgspec.structs.replace(CLAUDE, forward=frozenset({"user"}))
    b, u = adapter(AnthropicAdapter, forwarding, ok(message(text)))
    complete(b, call(max_tokens=7, user="u1"))
    assert sent(u)["metadata"] == {"user_id": "u1"} and sent(u)["max_tokens"] == 7


def test_anthropic_answers_thinking_usage_and_stop_reasons() -> None:
    thinking = {"type": "thinking", "thinking": "let me see", "signature": "sig"}
    answer = message(thinking, {"type": "text", "text": "yes"}, stop="max_tokens",
                     cache_creation_input_tokens=10, cache_read_input_tokens=20)  # fmt: skip
    a, _ = adapter(AnthropicAdapter, CLAUDE, ok(answer), ok(message(stop="refusal")))
    result = complete(a, call())
    choice = result.choices[0]
    assert (choice.text, choice.reasoning) == ("yes", "let me see")
    assert (choice.finish_reason, choice.native_finish_reason) == ("length", "max_tokens")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (35, 3)  # 5 + 10 + 20
    choice = complete(a, call()).choices[0]
    assert (choice.text, choice.finish_reason, choice.native_finish_reason) == (
        "",
        "content_filter",
        "refusal",
    )


def anthropic_stream(*, end: bool = True, error: bool = False) -> bytes:
    start = message(usage={"input_tokens": 9, "output_tokens": 1})
    start["content"], start["stop_reason"], start["usage"] = (
        [],
        None,
        {"input_tokens": 9, "output_tokens": 1},
    )
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "hm"}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": "s"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "ping"},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 4}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "\n"},
         "usage": {"output_tokens": 6}},
    ]  # fmt: skip
    if error:
        events.insert(
            8, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
    if end:
        events.append({"type": "message_stop"})
    return sse(*events, named=True)


def test_anthropic_streams_usage_as_totals_and_needs_message_stop() -> None:
    a, t = adapter(
        AnthropicAdapter,
        CLAUDE,
        ok(anthropic_stream()),
        ok(anthropic_stream(end=False)),
        ok(anthropic_stream(error=True)),
    )
    parts = stream(a, call(stream=True))
    assert sent(t)["stream"] is True
    choices = [c for p in parts for c in p.choices]
    assert "".join(c.text for c in choices) == "Hello"
    assert "".join(c.reasoning or "" for c in choices) == "hm"
    assert (choices[-1].finish_reason, choices[-1].native_finish_reason) == ("stop", "stop_sequence")
    usage = parts[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        9,
        6,
    )  # not 1 + 4 + 6
    with pytest.raises(UpstreamUnavailable, match="ended the stream"):
        stream(a, call(stream=True))
    with pytest.raises(UpstreamRateLimited, match="Overloaded"):
        stream(a, call(stream=True))


def test_anthropic_errors() -> None:
    def error(kind: str, text: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "message": text}}

    a, _ = adapter(
        AnthropicAdapter,
        CLAUDE,
        ok(error("overloaded_error", "Overloaded"), 529),
        ok(error("rate_limit_error", "slow"), 429, **{"retry-after": "12"}),
        ok(error("invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"), 400),
        ok(error("invalid_request_error", "temperature: range"), 400),
        ok(error("authentication_error", f"bad key {KEY}"), 401),
    )
    with pytest.raises(UpstreamRateLimited, match="529: overloaded_error: Overloaded"):
        complete(a, call())
    with pytest.raises(UpstreamRateLimited) as limited:
        complete(a, call())
    assert limited.value.retry_after == 12
    with pytest.raises(ContextLengthExceeded):
        complete(a, call())
    with pytest.raises(LlmrouterError) as rejected:
        complete(a, call())
    assert rejected.value.code == "upstream_rejected"
    with pytest.raises(LlmrouterError) as auth:
        complete(a, call())
    assert auth.value.code == "upstream_auth_failed" and KEY not in auth.value.message


def test_anthropic_capabilities_declare_its_limits() -> None:
    a, _ = adapter(AnthropicAdapter, CLAUDE)
    caps = a.capabilities(DeploymentSettings(provider="p", model="claude"))
    assert caps.ranges == {"temperature": (0, 1), "top_p": (0, 1)}
    assert {"seed", "logprobs", "n", "logit_bias", "echo", "suffix"}.isdisjoint(caps.parameters)
    thinking = msgspec.structs.replace(CLAUDE, thinking_budget=2048, max_output_tokens=8000)
    answers = [ok(message({"type": "text", "text": "x"})) for _ in range(3)]
    b, u = adapter(AnthropicAdapter, thinking, *answers)
    refuses = b.capabilities(DeploymentSettings(provider="p", model="c")).refuses
    assert refuses is not None  # while thinking: temperature 1 only, top_p from 0.95, no forced call
    assert refuses(Generation(temperature=0.5))[0] == "temperature"  # type: ignore[index]
    assert refuses(Generation(top_p=0.9))[0] == "top_p"  # type: ignore[index]
    assert refuses(Generation(temperature=1, top_p=0.95)) is None
    # A request that turns the thinking off takes what the API takes without it.
    off = ReasoningRequest(enabled=False)
    assert refuses(Generation(temperature=0.0, reasoning=off)) is None
    # ... and one that turns it on, where the provider does not think, is held to it.
    assert caps.refuses is not None
    assert caps.refuses(Generation(temperature=0.0)) is None
    on = ReasoningRequest(effort="low")
    assert caps.refuses(Generation(temperature=0.0, reasoning=on))[0] == "temperature"  # type: ignore[index]
    complete(b, call(max_tokens=10))
    assert sent(u)["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent(u)["max_tokens"] == 2058  # the budget on top of the text's
    complete(b, call(max_tokens=7000))
    assert sent(u)["max_tokens"] == 8000  # never past the most the model writes
    complete(b, call(max_tokens=None))
    assert sent(u)["max_tokens"] == 8000
    with pytest.raises(ConfigError, match="more than thinking_budget"):
        adapter(AnthropicAdapter, msgspec.structs.replace(CLAUDE, thinking_budget=2048))
    with pytest.raises(ConfigError, match="no place for `metadata`"):
        adapter(AnthropicAdapter, msgspec.structs.replace(CLAUDE, forward=frozenset({"metadata"})))
    pinned = DeploymentSettings(
        provider="p", model="c", unsupported_parameters=frozenset({"temperature"})
    )
    assert "temperature" not in a.capabilities(pinned).parameters


# -- gemini ---------------------------------------------------------------------------------------

GEMINI = GeminiProvider(base_url="http://up", api_key=KEY)


def candidate(*parts: dict[str, Any], finish: str | None = "STOP", index: int = 0) -> dict[str, Any]:
    c: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": index}
    if finish:
        c["finishReason"] = finish
    return c


def gemini(
    *candidates: dict[str, Any], prompt: int = 4, out: int = 2, thoughts: int = 0
) -> dict[str, Any]:
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": out, "totalTokenCount": prompt + out}
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return {"candidates": list(candidates), "usageMetadata": usage, "modelVersion": "gemini-x"}


def test_gemini_sends_the_key_in_a_header_and_the_config_in_its_terms() -> None:
    a, t = adapter(GeminiAdapter, GEMINI, ok(gemini(candidate({"text": ""}))))  # (what it sends)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    body = {"n": 2, "seed": 3, "temperature": 0.5, "top_p": 0.9, "stop": ["a", "b"], "logprobs": 2}
    body |= {"presence_penalty": 0.5, "frequency_penalty": 0.1, "response_format": fmt}
    complete(a, call("gemini-2.5-flash", **body))
    req = t.requests[0]
    assert req.url == "http://up/v1beta/models/gemini-2.5-flash:generateContent"
    assert KEY not in req.url and req.headers["x-goog-api-key"] == KEY
    assert sent(t) == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "generationConfig": {
            "temperature": 0.5,
            "topP": 0.9,
            "seed": 3,
            "presencePenalty": 0.5,
            "frequencyPenalty": 0.1,
            "candidateCount": 2,
            "stopSequences": ["a", "b"],
            "maxOutputTokens": 16,
            "responseLogprobs": True,
            "logprobs": 2,
            "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object"},
        },
    }


def test_gemini_answers_thoughts_usage_safety_and_logprobs() -> None:
    logprobs = {
        "chosenCandidates": [
            {"token": "y", "logProbability": -0.5},
            {"token": "é", "logProbability": -0.25},
        ],
        "topCandidates": [
            {
                "candidates": [
                    {"token": "y", "logProbability": -0.5},
                    {"token": "n", "logProbability": -1},
                ]
            },
            {"candidates": [{"token": "é", "logProbability": -0.25}]},
        ],
    }
    first = candidate({"text": "why", "thought": True}, {"text": "yé"})
    first["logprobsResult"] = logprobs
    a, _ = adapter(
        GeminiAdapter,
        GEMINI,
        ok(gemini(first, candidate({"text": ""}, finish="SAFETY", index=1), thoughts=7)),
        ok({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}),
    )
    result = complete(a, call(n=2, logprobs=2))
    one, two = result.choices
    assert (one.text, one.reasoning, one.finish_reason) == ("yé", "why", "stop")
    assert one.logprobs is not None and one.logprobs.tokens == ["y", "é"]
    assert one.logprobs.text_offset == [0, 1] and one.logprobs.top_logprobs == [
        {"y": -0.5, "n": -1},
        {"é": -0.25},
    ]
    assert (two.finish_reason, two.native_finish_reason) == ("content_filter", "SAFETY")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 9)  # thoughts count
    with pytest.raises(UpstreamRefused, match="blocked the prompt: SAFETY"):
        complete(a, call())


def test_gemini_streams_running_totals_and_needs_every_finish() -> None:
    chunks = [
        gemini(candidate({"text": "He"}, finish=None), out=1),
        gemini(candidate({"text": "llo"}, finish=None), out=2),
        gemini(candidate({"text": "!"}, finish="MAX_TOKENS"), out=3),
    ]
    a, t = adapter(GeminiAdapter, GEMINI, ok(sse(*chunks)), ok(sse(*chunks[:2])))
    parts = stream(a, call(stream=True))
    assert t.requests[0].url.endswith(":streamGenerateContent?alt=sse")
    assert "".join(c.text for p in parts for c in p.choices) == "Hello!"
    assert parts[-1].choices[-1].finish_reason == "length"
    assert [p.usage is not None for p in parts] == [False, False, True]
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3  # not 1 + 2 + 3
    with pytest.raises(UpstreamUnavailable, match="ended the stream"):
        stream(a, call(stream=True))


def test_gemini_resource_exhausted_carries_its_retry_delay() -> None:
    exhausted = {
        "error": {
            "code": 429,
            "message": "Resource has been exhausted",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}],
        }
    }
    said = "The input token count (9999) exceeds the maximum number of tokens allowed (100)."
    too_long = {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": said}}
    a, _ = adapter(GeminiAdapter, GEMINI, ok(exhausted, 429), ok(too_long, 400))
    with pytest.raises(UpstreamRateLimited) as limited:
        complete(a, call())
    assert limited.value.retry_after == 7 and "RESOURCE_EXHAUSTED" in limited.value.message
    with pytest.raises(ContextLengthExceeded):
        complete(a, call())


# -- what the review found ------------------------------------------------------------------------


def test_logprobs_asked_for_and_not_returned_are_a_failure_not_an_empty_list() -> None:
    a, _ = adapter(OpenAIChatAdapter, CHAT, ok(chat_answer(content="hello")))
    with pytest.raises(UpstreamUnavailable, match="without the logprobs"):
        complete(a, call(logprobs=2))
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    a, _ = adapter(OpenAIChatAdapter, CHAT, ok(sse(chunk, done=True)))
    with pytest.raises(UpstreamUnavailable, match="without the logprobs"):
        stream(a, call(logprobs=0, stream=True))
    g, _ = adapter(GeminiAdapter, GEMINI, ok(gemini(candidate({"text": "yo"}))))
    with pytest.raises(UpstreamUnavailable, match="without the logprobs"):
        complete(g, call(logprobs=1))


def test_hostile_bodies_are_the_deployments_failure_never_a_foreign_exception() -> None:
    deep = b'{"error": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for kind, settings in (
        (OpenAIChatAdapter, CHAT),
        (GeminiAdapter, GEMINI),
        (AnthropicAdapter, CLAUDE),
    ):
        a, _ = adapter(kind, settings, ok(deep), ok(deep))
        with pytest.raises(UpstreamUnavailable):
            complete(a, call())
        with pytest.raises(UpstreamUnavailable):
            stream(a, call(stream=True))
    bad = chat_answer(content="x")
    bad["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -1, "bytes": [999]}]}
    a, _ = adapter(OpenAIChatAdapter, CHAT, ok(bad))
    with pytest.raises(UpstreamUnavailable):
        complete(a, call(logprobs=1))


def test_retry_delays_from_a_body_are_held_to_an_hour_and_finite() -> None:
    def exhausted(delay: str) -> _http.MockResponse:
        detail = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
        body = {
            "error": {"code": 429, "message": "x", "status": "RESOURCE_EXHAUSTED", "details": [detail]}
        }
        return ok(body, 429)

    a, _ = adapter(GeminiAdapter, GEMINI, exhausted("86400s"), exhausted("1e400s"), exhausted("nans"))
    for expected in (3600, None, None):
        with pytest.raises(UpstreamRateLimited) as limited:
            complete(a, call())
        assert limited.value.retry_after == expected
        limited.value.headers()  # (an infinite delay once raised OverflowError here)
    error = UpstreamRateLimited("x", retry_after=float("inf"))
    assert error.headers() == []


def test_a_bad_gemini_key_is_the_deployments_fault_not_the_clients() -> None:
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    body = {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT",
                      "details": [info]}}  # fmt: skip
    a, _ = adapter(GeminiAdapter, GEMINI, ok(body, 400))
    with pytest.raises(LlmrouterError) as caught:
        complete(a, call())
    assert caught.value.code == "upstream_auth_failed" and caught.value.blames_deployment


def test_gemini_model_names_thinking_and_forward() -> None:
    thinking = msgspec.structs.replace(GEMINI, thinking_budget=512)
    a, t = adapter(GeminiAdapter, thinking, ok(gemini(candidate({"text": "x"}))))
    complete(a, call("models/gemini-2.5-flash", max_tokens=10))
    assert t.requests[0].url == "http://up/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent(t)["generationConfig"]["maxOutputTokens"] == 522  # thoughts count against it
    with pytest.raises(ConfigError, match="no place for"):
        adapter(GeminiAdapter, msgspec.structs.replace(GEMINI, forward=frozenset({"user"})))


def test_openai_chat_reasoning_budget_and_a_deployments_own_stream_usage() -> None:
    settings = msgspec.structs.replace(CHAT, reasoning_budget=1000)
    chunks = sse(
        {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}, done=True
    )
    a, t = adapter(OpenAIChatAdapter, settings, ok(chat_answer(content="x")), ok(chunks))
    complete(a, call(max_tokens=20))
    assert sent(t)["max_completion_tokens"] == 1020
    lacking = DeploymentSettings(
        provider="p", model="m", unsupported_parameters=frozenset({"stream_usage"})
    )
    assert not a.capabilities(lacking).stream_usage
    c = call(stream=True)
    parts = stream(a, msgspec.structs.replace(c, deployment=lacking))
    assert "stream_options" not in sent(t) and parts[-1].usage_estimated


def test_anthropic_takes_no_whitespace_stop_natively_and_knows_its_context_error() -> None:
    said = "input length and `max_tokens` exceed context limit: 199000 + 4096 > 200000"
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": said}}
    a, _ = adapter(AnthropicAdapter, CLAUDE, ok(error, 400))
    with pytest.raises(ContextLengthExceeded):
        complete(a, call())
    caps = a.capabilities(DeploymentSettings(provider="p", model="c"))
    _, request = from_completions(*decode_completion_request(b'{"prompt": "x", "stop": ["\\n", "END"]}'))
    from llmrouter.emulation.shape import Shape, requested_parameters, shape_for

    shaped = shape_for(caps, MODEL, request, requested_parameters(request), None)
    assert isinstance(shaped, Shape)
    assert shaped.request.stop == ["END"] and shaped.stops == ("\n", "END") and "stop" in shaped.emulated
    _, only = from_completions(*decode_completion_request(b'{"prompt": "x", "stop": "\\n"}'))
    shaped = shape_for(caps, MODEL, only, requested_parameters(only), None)
    assert isinstance(shaped, Shape) and shaped.request.stop is None  # never an empty list


def test_schema_subsets() -> None:
    closed = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}  # fmt: skip
    assert anthropic_problem(closed, False) is None
    ranged = {**closed, "properties": {"a": {"type": "integer", "minimum": 1}}}
    assert anthropic_problem(ranged, False) == "structured outputs have no `minimum`"
    kids = {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}
    node = {"type": "object", "additionalProperties": False, "properties": kids}
    tree = {"$defs": {"node": node}, "$ref": "#/$defs/node"}
    assert anthropic_problem(tree, False) == "structured outputs take no recursive schema"
    assert (
        anthropic_problem({"type": "array", "minItems": 2}, False)
        == "structured outputs take `minItems` 0 or 1 only"
    )
    assert openai_strict_problem({"anyOf": [closed]}, True) == "strict mode needs an object at the root"
    assert openai_strict_problem(
        {**closed, "properties": {"a": {"oneOf": [{"type": "integer"}]}}}, True
    ) == ("strict mode has no `oneOf`")
    assert gemini_problem(closed, False) is None
    assert (
        gemini_problem({"type": "string", "pattern": "a+"}, False)
        == "Gemini's schemas have no `pattern`"
    )


# -- a conversation, as the chat endpoint will send one -------------------------------------------

CONVERSATION = (
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello."),
    Message("developer", "Answer in French."),
    Message("user", "Again?"),
)


def conversation_call(**fields: Any) -> Call:
    request = Generation(messages=CONVERSATION, max_tokens=5, **fields)
    return Call(DeploymentSettings(provider="p", model="m"), request, Timeouts(first_token=2, idle=2))


def test_each_chat_kind_sends_a_conversation_in_its_own_terms() -> None:
    a, t = adapter(OpenAIChatAdapter, CHAT, ok(chat_answer(content="")))
    complete(a, conversation_call())
    assert sent(t)["messages"] == [{"role": m.role, "content": m.content} for m in CONVERSATION]
    a, t = adapter(AnthropicAdapter, CLAUDE, ok(message()))
    complete(a, conversation_call())
    assert sent(t)["system"] == "Be brief.\n\nAnswer in French."
    assert sent(t)["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    a, t = adapter(GeminiAdapter, GEMINI, ok(gemini(candidate({"text": ""}))))
    complete(a, conversation_call())
    assert sent(t)["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nAnswer in French."}]}
    assert sent(t)["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}]},
        {"role": "model", "parts": [{"text": "Hello."}]},
        {"role": "user", "parts": [{"text": "Again?"}]},
    ]


def test_budgets_are_held_to_the_most_the_model_writes() -> None:
    chat = msgspec.structs.replace(CHAT, reasoning_budget=25_000, max_output_tokens=100_000)
    a, t = adapter(OpenAIChatAdapter, chat, ok(chat_answer(content="")))
    complete(a, call(max_tokens=90_000))
    assert sent(t)["max_completion_tokens"] == 100_000
    thinking = msgspec.structs.replace(GEMINI, thinking_budget=8192, max_output_tokens=65_536)
    g, u = adapter(GeminiAdapter, thinking, ok(gemini(candidate({"text": ""}))))
    complete(g, call(max_tokens=65_000))
    assert sent(u)["generationConfig"]["maxOutputTokens"] == 65_536


def test_the_completions_adapter_too_fails_an_answer_without_the_logprobs_asked_for() -> None:
    from llmrouter.providers.openai import OpenAIAdapter
    from llmrouter.settings import OpenAIProvider

    answer = {"choices": [{"text": "ok", "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    a, _ = adapter(OpenAIAdapter, OpenAIProvider(base_url="http://up/v1"), ok(answer), ok(answer))
    with pytest.raises(UpstreamUnavailable, match="without the logprobs"):
        complete(a, call(logprobs=2))
    assert complete(a, call()).choices[0].text == "ok"  # not asked for: none needed


def test_schema_subsets_find_cycles_open_type_lists_and_what_strict_mode_lacks() -> None:
    a = {"type": "object", "additionalProperties": False, "properties": {"b": {"$ref": "#/$defs/b"}}}
    b = {"type": "object", "additionalProperties": False, "properties": {"a": {"$ref": "#/$defs/a"}}}
    mutual = {"$defs": {"a": a, "b": b}, "$ref": "#/$defs/a"}
    assert anthropic_problem(mutual, False) == "structured outputs take no recursive schema"
    chain = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "string"}}, "$ref": "#/$defs/a"}
    assert anthropic_problem(chain, False) is None  # a chain, not a cycle
    nullable = {"type": ["object", "null"]}
    assert "additionalProperties" in (anthropic_problem(nullable, False) or "")
    closed = {"type": "object", "properties": {"a": {"type": "string", "default": "x"}},
              "required": ["a"], "additionalProperties": False}  # fmt: skip
    assert openai_strict_problem(closed, True) == "strict mode has no `default`"
    assert anthropic_problem(
        {**closed, "properties": {"a": {"type": "string", "format": "int64"}}}, False
    )


def batches(a: Any, c: Call) -> tuple[list[list[StreamPart]], BaseException | None]:
    """A streamed answer's batches as they came, and the failure that ended it (if one did)."""
    got: list[list[StreamPart]] = []

    async def run() -> None:
        async for batch in a.stream(c):
            got.append(nonempty(batch))

    try:
        asyncio.run(run())
    except Exception as exc:
        return got, exc
    return got, None


def texts(got: list[list[StreamPart]]) -> list[list[str]]:
    return [[c.text for p in batch for c in p.choices] for batch in got]


def test_the_events_of_one_read_go_on_as_one_batch_and_a_failure_after_the_parts_before_it() -> None:
    from llmrouter.providers.openai import OpenAIAdapter
    from llmrouter.settings import OpenAIProvider

    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    usage = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}
    whole = sse(piece("a"), piece("b"), piece("c", "stop"), usage, done=True)
    later = sse(piece("never"))
    broken = sse(piece("a"), piece("b")) + b"data: {not json\n\n" + sse(piece("never"))
    a, _ = adapter(
        OpenAIAdapter,
        OpenAIProvider(base_url="http://up/v1"),
        _http.MockResponse(200, [whole + later]),  # what follows [DONE] is not read as the answer
        _http.MockResponse(
            200, [sse(piece("a")), sse(piece("b"), piece("c", "stop")), sse(usage, done=True)]
        ),
        _http.MockResponse(200, [broken]),
    )
    got, failure = batches(a, call(stream=True))
    assert failure is None and texts(got) == [["a", "b", "c"]]  # (the usage part has no choices)
    assert got[0][-1].usage is not None and got[0][-1].usage.total_tokens == 5
    got, failure = batches(a, call(stream=True))
    assert failure is None and texts(got) == [["a"], ["b", "c"], []]
    got, failure = batches(a, call(stream=True))
    assert texts(got) == [["a", "b"]]
    assert isinstance(failure, UpstreamUnavailable) and "cannot read" in str(failure)


def test_a_stream_closed_early_gives_its_connection_back_at_once() -> None:
    """A client that leaves mid-stream closes the adapter's stream: its connection goes back then,
    not whenever the event loop gets round to finalizing a generator left behind."""
    from llmrouter.providers.openai import OpenAIAdapter
    from llmrouter.settings import OpenAIProvider

    text = {"choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": None}]}
    delta = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    kinds: list[tuple[type[Any], Any, bytes]] = [
        (OpenAIAdapter, OpenAIProvider(base_url="http://up/v1"), sse(text)),
        (OpenAIChatAdapter, CHAT, sse(delta)),
        (AnthropicAdapter, CLAUDE, sse({"type": "message_start", "message": message()}, block,
         {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}},
         named=True)),
        (GeminiAdapter, GEMINI, sse(gemini(candidate({"text": "a"}, finish=None)))),
    ]  # fmt: skip
    for kind, settings, first in kinds:
        response = _http.MockResponse(200, [first, first])  # and the rest is still to come
        a, _ = adapter(kind, settings, response)

        async def leave_after_the_first_batch(a: Any = a, response: Any = response) -> bool:
            parts = a.stream(call(stream=True))
            assert nonempty(await anext(parts))
            await parts.aclose()
            return response.released

        assert asyncio.run(leave_after_the_first_batch()), kind.__name__


def test_the_local_engines_stream_closed_early_stops_its_job_at_once() -> None:
    """As the HTTP kinds' (above): a client that leaves stops the local job then, not when the
    event loop finalizes a generator left behind (found by a review)."""
    from llmrouter.providers._llama_engine import ChoiceDelta
    from llmrouter.providers.llamacpp import LlamaCppAdapter

    stopped: list[str] = []

    class Engine(LlamaCppAdapter):
        def __init__(self) -> None: ...  # (no model: `_run` plays the engine's job)

        async def _run(self, call: Call) -> AsyncIterator[Any]:
            try:
                for i in range(100):
                    yield ChoiceDelta(0, f"t{i}", None)
                    await asyncio.sleep(0)
            finally:
                stopped.append("job cancelled")

    async def leave_after_the_first_batch() -> list[str]:
        parts = Engine().stream(call(stream=True))
        assert nonempty(await anext(parts))
        await parts.aclose()
        return list(stopped)

    assert asyncio.run(leave_after_the_first_batch()) == ["job cancelled"]
