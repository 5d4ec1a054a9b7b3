"""The chat fakes are faithful: each provider's official SDK (openai, anthropic, google-genai),
pointed at its fake, parses the answers, streams, usage, stop reasons and errors it would get from
the real API, and notices (or not: said where) a stream cut short.

What the SDKs do with a cut stream, as these tests pin it:
  openai     no [DONE]: nothing noticed, the iteration just ends; a reset mid-stream is an
             APIConnectionError; an in-band {"error"} chunk is an APIError
  anthropic  no message_stop: nothing noticed, get_final_message() answers; a reset mid-stream
             is httpx2's RemoteProtocolError, not wrapped; `event: error` is an APIStatusError
             whose status_code is the stream's 200
  genai      no final chunk: nothing noticed, the last chunk has no finish_reason; a reset is
             httpx2's RemoteProtocolError, not wrapped; an in-band {"error"} chunk is a
             ServerError with that error's code
"""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2
import openai
import pydantic
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.fakes.anthropic import SIGNATURE

pytestmark = pytest.mark.timeout(60)

USER = [{"role": "user", "content": "Say something"}]


class City(pydantic.BaseModel):
    name: str
    population: int


def stats(base: str) -> dict[str, object]:
    return dict(httpx.get(f"{base}/_stats").json())


# --- OpenAI Chat Completions ---------------------------------------------------------------


def oa(base: str, timeout: float = 5) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-fake", max_retries=0, timeout=timeout)


def test_openai_plain_answer(fake_openai_chat: str) -> None:
    raw = oa(fake_openai_chat).chat.completions.with_raw_response.create(model="ok", messages=USER)
    done = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.model == "ok" and done.system_fingerprint == "fp_fake" and done.created > 0
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello from fake"
    assert choice.finish_reason == "stop" and choice.logprobs is None
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (2, 3, 5)
    seen = stats(fake_openai_chat)
    assert seen["credentials"][-1] == {"authorization": "Bearer sk-fake"}
    assert seen["last_body"] == {"model": "ok", "messages": USER}


def test_openai_lm_honours_n_seed_max_tokens_and_logprobs(fake_openai_chat: str) -> None:
    args = {"model": "lm", "messages": USER, "max_completion_tokens": 3, "n": 2, "seed": 7}
    done = oa(fake_openai_chat).chat.completions.create(**args, logprobs=True, top_logprobs=2)
    again = oa(fake_openai_chat).chat.completions.create(**args)
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.message.content for c in done.choices] == [c.message.content for c in again.choices]
    assert done.choices[0].message.content != done.choices[1].message.content
    for choice in done.choices:
        assert choice.finish_reason == "length"
        content = choice.logprobs.content
        assert len(content) == 3 and "".join(t.token for t in content) == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
        assert all(t.bytes == list(t.token.encode()) and t.logprob < 0 for t in content)
    assert done.usage.completion_tokens == 6


def test_openai_stop_and_temperature_zero(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)
    args = {"model": "lm", "messages": USER, "max_tokens": 30, "temperature": 0}
    free = client.chat.completions.create(**args).choices[0].message.content
    assert free == client.chat.completions.create(**args).choices[0].message.content
    stopped = client.chat.completions.create(**args, stop=[" gamma", " delta"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert free.startswith(stopped.message.content) and " gamma" not in stopped.message.content


def test_openai_stream_with_usage(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)
    args = {"model": "lm", "messages": USER, "max_tokens": 4, "seed": 1, "logprobs": True}
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    tokens = [
        t.token
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert "".join(tokens) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.parametrize(
    ("model", "field"), [("lm-think", "reasoning_content"), ("reasoning", "reasoning")]
)
def test_openai_reasoning_fields(fake_openai_chat: str, model: str, field: str) -> None:
    client = oa(fake_openai_chat)
    done = client.chat.completions.create(model=model, messages=USER, max_tokens=2, seed=1)
    assert getattr(done.choices[0].message, field) == "Pondering the question."
    assert done.usage.completion_tokens_details.reasoning_tokens == 4
    assert done.usage.completion_tokens == 4 + 2
    chunks = list(
        client.chat.completions.create(model=model, messages=USER, max_tokens=2, seed=1, stream=True)
    )
    said = "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks)
    assert said == "Pondering the question."
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content


def test_openai_json_modes(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)
    loose = client.chat.completions.create(
        model="lm", messages=USER, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(loose.choices[0].message.content), dict)
    parsed = client.chat.completions.parse(model="lm", messages=USER, response_format=City)
    assert parsed.choices[0].message.parsed == City(name="alpha", population=1)
    sent = stats(fake_openai_chat)["last_body"]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True


def test_openai_variants(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter: seed"):
        client.chat.completions.create(model="lm-no-seed", messages=USER, seed=1)
    refusal = client.chat.completions.create(model="refusal", messages=USER).choices[0]
    assert refusal.message.content is None and refusal.message.refusal
    filtered = client.chat.completions.create(model="lm-content-filter", messages=USER).choices[0]
    assert filtered.finish_reason == "content_filter" and len(filtered.message.content) > 0
    cached = client.chat.completions.create(model="cache", messages=USER)
    assert cached.usage.prompt_tokens_details.cached_tokens == 64


def test_openai_errors(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="status-429", messages=USER)
    assert limited.value.status_code == 429 and limited.value.response.headers["retry-after"] == "7"
    assert limited.value.code == "rate_limit_exceeded" and limited.value.type == "requests"
    with pytest.raises(openai.RateLimitError) as bare:
        client.chat.completions.create(model="status-429-bare", messages=USER)
    assert "retry-after" not in bare.value.response.headers
    with pytest.raises(openai.InternalServerError) as broken:
        client.chat.completions.create(model="x", messages=USER, extra_headers={"X-Fault": "status-503"})
    assert broken.value.status_code == 503
    for fault, code in [
        ("context-400", "context_length_exceeded"),
        ("refuse", "content_policy_violation"),
    ]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=fault, messages=USER)
        assert bad.value.code == code and bad.value.body["message"]
    keyless = httpx.post(
        f"{fake_openai_chat}/v1/chat/completions", json={"model": "ok", "messages": USER}
    )
    assert keyless.status_code == 401 and keyless.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.APITimeoutError):
        oa(fake_openai_chat, timeout=0.5).chat.completions.create(model="hang", messages=USER)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="reset-before", messages=USER)


def test_openai_cut_streams(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)

    def stream(fault: str) -> list[openai.types.chat.ChatCompletionChunk]:
        got = []
        args = {"stream_options": {"include_usage": True}}
        for chunk in client.chat.completions.create(model=fault, messages=USER, stream=True, **args):
            got.append(chunk)
        return got

    assert stream("truncated")[-1].usage is not None  # everything but [DONE]: not noticed
    with pytest.raises(openai.APIError, match="server had an error"):
        stream("stream-error")
    with pytest.raises(openai.APIConnectionError):
        stream("reset-after-2")
    with pytest.raises(json.JSONDecodeError):
        stream("malformed")
    with pytest.raises(openai.APITimeoutError):
        list(
            oa(fake_openai_chat, timeout=0.5).chat.completions.create(
                model="hang-after-2", messages=USER, stream=True
            )
        )


# --- Anthropic Messages ----------------------------------------------------------------------


def an(base: str, timeout: float = 5) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="sk-ant-fake", max_retries=0, timeout=timeout)


THINK = {"type": "enabled", "budget_tokens": 1024}


def test_anthropic_plain_answer(fake_anthropic: str) -> None:
    raw = an(fake_anthropic).messages.with_raw_response.create(model="ok", max_tokens=50, messages=USER)
    message = raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello from fake")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (2, 3)
    assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
    seen = stats(fake_anthropic)
    headers = seen["last_headers"]
    assert headers["anthropic-version"]
    # anthropic 2.15 sends the API key as a bearer token, not as x-api-key
    assert seen["credentials"][-1]["authorization"] == "Bearer sk-ant-fake"


def test_anthropic_stop_reasons(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    capped = client.messages.create(model="lm", max_tokens=3, messages=USER)
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 3
    long = client.messages.create(model="lm", max_tokens=30, messages=USER)
    stopped = client.messages.create(
        model="lm",
        max_tokens=30,
        messages=USER,
        stop_sequences=[" gamma"],
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " gamma"
    assert long.content[0].text.startswith(stopped.content[0].text)
    refused = client.messages.create(model="refuse", max_tokens=30, messages=USER)
    assert refused.stop_reason == "refusal" and refused.stop_details.type == "refusal"
    window = client.messages.create(model="lm-window", max_tokens=30, messages=USER)
    assert window.stop_reason == "model_context_window_exceeded"


def test_anthropic_stream_helper_and_raw_events(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    args = {"model": "lm-cache", "max_tokens": 5, "messages": USER}
    whole = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == text and final.stop_reason == "max_tokens"
    # input usage from message_start survives; output_tokens is message_delta's cumulative count
    assert final.usage.output_tokens == 5 and final.usage.input_tokens == whole.usage.input_tokens
    assert (final.usage.cache_creation_input_tokens, final.usage.cache_read_input_tokens) == (32, 64)
    events = list(client.messages.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the ping after the first content_block_start is not handed on
    assert events[0].message.usage.output_tokens == 1
    assert events[-2].usage.output_tokens == 5


def test_anthropic_thinking(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    args = {
        "model": "lm-think",
        "max_tokens": 2048,
        "messages": USER,
        "thinking": THINK,
        "stop_sequences": [" zeta"],
    }
    message = client.messages.create(**args)
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == "Pondering the question."
    assert thinking.signature and text.type == "text"
    with client.messages.stream(**args) as stream:
        seen = {event.type for event in stream}
        final = stream.get_final_message()
    assert {"thinking", "signature", "text"} <= seen
    assert final.content[0].thinking == thinking.thinking
    assert final.content[0].signature == thinking.signature
    plain = client.messages.create(model="lm-think", max_tokens=5, messages=USER)
    assert [b.type for b in plain.content] == ["text"]  # no thinking unless asked


def test_anthropic_structured_output_and_thinking_display(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    parsed = client.messages.parse(model="lm", max_tokens=50, messages=USER, output_format=City)
    assert parsed.parsed_output == City(name="alpha", population=1)
    sent = stats(fake_anthropic)["last_body"]["output_config"]["format"]
    assert sent["type"] == "json_schema" and sent["schema"]["required"] == ["name", "population"]
    hidden = {**THINK, "display": "omitted"}
    signed = client.messages.create(model="lm-think", max_tokens=2048, messages=USER, thinking=hidden)
    assert (signed.content[0].thinking, signed.content[0].signature) == ("", SIGNATURE)
    with client.messages.stream(
        model="lm-think", max_tokens=2048, messages=USER, thinking={"type": "adaptive"}
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == "Pondering the question."


def test_anthropic_errors(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="status-429", max_tokens=5, messages=USER)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.RateLimitError) as later:
        client.messages.create(model="retry-after-3", max_tokens=5, messages=USER)
    assert later.value.response.headers["retry-after"] == "3"
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        client.messages.create(model="overloaded", max_tokens=5, messages=USER)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > \d+ maximum"):
        client.messages.create(model="context-400", max_tokens=5, messages=USER)
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(model="status-500", max_tokens=5, messages=USER)
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model="lm-think", max_tokens=1000, messages=USER, thinking=THINK)
    with pytest.raises(anthropic.APITimeoutError):
        an(fake_anthropic, timeout=0.5).messages.create(model="hang", max_tokens=5, messages=USER)
    url = f"{fake_anthropic}/v1/messages"
    body = {"model": "ok", "max_tokens": 5, "messages": USER}
    bare = httpx.post(url, json=body, headers={"anthropic-version": "2023-06-01"})
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    old = httpx.post(url, json=body, headers={"x-api-key": "k"})
    assert old.status_code == 400 and "anthropic-version" in old.json()["error"]["message"]
    keyed = httpx.post(url, json=body, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    assert keyed.status_code == 200
    assert stats(fake_anthropic)["credentials"][-1] == {
        "x-api-key": "k",
        "anthropic-version": "2023-06-01",
    }


def test_anthropic_cut_streams(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    with (
        pytest.raises(anthropic.APIStatusError) as inband,
        client.messages.stream(model="stream-error", max_tokens=5, messages=USER) as stream,
    ):
        stream.until_done()
    assert inband.value.status_code == 200  # the stream's own status
    assert inband.value.body["error"]["type"] == "overloaded_error"
    kinds = [
        e.type
        for e in client.messages.create(model="truncated", max_tokens=5, messages=USER, stream=True)
    ]
    assert kinds[-1] == "message_delta"  # no message_stop, and the SDK does not mind:
    with client.messages.stream(model="truncated", max_tokens=5, messages=USER) as stream:
        assert stream.get_final_message().stop_reason == "end_turn"
    with pytest.raises(httpx2.RemoteProtocolError):  # httpx2's, through the SDK unwrapped
        list(client.messages.create(model="reset-after-2", max_tokens=5, messages=USER, stream=True))
    with pytest.raises(json.JSONDecodeError):
        list(client.messages.create(model="malformed", max_tokens=5, messages=USER, stream=True))


# --- Gemini ----------------------------------------------------------------------------------


def gm(base: str, timeout_ms: int = 5000, version: str = "v1beta") -> genai.Client:
    options = types.HttpOptions(
        base_url=base,
        api_version=version,
        timeout=timeout_ms,
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key="g-fake", http_options=options)


def test_gemini_plain_answer(fake_gemini: str) -> None:
    for version in ("v1beta", "v1"):  # google-genai's default is v1; the router's, v1beta
        client = gm(fake_gemini, version=version)  # kept: a Client closes its transport when collected
        answer = client.models.generate_content(model="ok", contents="Say something")
        assert answer.text == "Hello from fake"
        candidate = answer.candidates[0]
        assert candidate.finish_reason == types.FinishReason.STOP and candidate.index == 0
        assert candidate.content.role == "model"
        usage = answer.usage_metadata
        assert (usage.prompt_token_count, usage.candidates_token_count, usage.total_token_count) == (
            2,
            3,
            5,
        )
        assert answer.model_version == "ok" and answer.response_id
        seen = stats(fake_gemini)
        assert seen["last_path"] == f"/{version}/models/ok:generateContent"
        assert seen["credentials"][-1] == {"x-goog-api-key": "g-fake"}


def test_gemini_candidates_logprobs_and_stops(fake_gemini: str) -> None:
    config = types.GenerateContentConfig(
        max_output_tokens=3, candidate_count=2, seed=5, response_logprobs=True, logprobs=2
    )
    client = gm(fake_gemini)
    answer = client.models.generate_content(model="lm", contents="Say something", config=config)
    assert [c.index for c in answer.candidates] == [0, 1]
    for candidate in answer.candidates:
        assert candidate.finish_reason == types.FinishReason.MAX_TOKENS
        result = candidate.logprobs_result
        chosen = [c.token for c in result.chosen_candidates]
        assert "".join(chosen) == candidate.content.parts[0].text and len(chosen) == 3
        assert all(len(top.candidates) == 2 for top in result.top_candidates)
        assert candidate.avg_logprobs == pytest.approx(
            sum(c.log_probability for c in result.chosen_candidates) / 3
        )
    assert answer.usage_metadata.candidates_token_count == 6
    stop = types.GenerateContentConfig(max_output_tokens=30, temperature=0, stop_sequences=[" gamma"])
    stopped = client.models.generate_content(model="lm", contents="Say something", config=stop)
    assert (
        stopped.candidates[0].finish_reason == types.FinishReason.STOP and " gamma" not in stopped.text
    )


def test_gemini_stream(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    config = types.GenerateContentConfig(max_output_tokens=4, seed=3)
    whole = client.models.generate_content(model="lm", contents="Say something", config=config)
    chunks = list(
        client.models.generate_content_stream(model="lm", contents="Say something", config=config)
    )
    assert stats(fake_gemini)["last_query"] == {"alt": "sse"}
    assert "".join(c.text for c in chunks) == whole.text
    counts = [c.usage_metadata.candidates_token_count for c in chunks]
    assert counts == [1, 2, 3, 4]  # the usage so far, on every chunk
    assert [c.candidates[0].finish_reason for c in chunks] == [
        None,
        None,
        None,
        types.FinishReason.MAX_TOKENS,
    ]
    raw = httpx.post(
        f"{fake_gemini}/v1beta/models/ok:streamGenerateContent?alt=sse",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "k"},
    )
    assert raw.content.startswith(b"data: {") and raw.content.endswith(b"}\r\n\r\n")
    array = httpx.post(
        f"{fake_gemini}/v1beta/models/x:streamGenerateContent",  # without alt=sse: a JSON array
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "k", "X-Fault": "ok"},
    )
    assert [c["candidates"][0]["content"]["parts"][0]["text"] for c in array.json()] == [
        "Hello",
        " from",
        " fake",
    ]


def test_gemini_thoughts(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    shown = types.GenerateContentConfig(
        max_output_tokens=2, thinking_config=types.ThinkingConfig(include_thoughts=True)
    )
    answer = client.models.generate_content(model="lm-think", contents="Say something", config=shown)
    thought, text = answer.candidates[0].content.parts
    assert thought.thought is True and thought.text == "Pondering the question."
    assert not text.thought and answer.text == text.text
    usage = answer.usage_metadata
    assert usage.thoughts_token_count == 4 and usage.candidates_token_count == 2
    assert usage.total_token_count == usage.prompt_token_count + 2 + 4
    chunks = list(
        client.models.generate_content_stream(model="lm-think", contents="Say something", config=shown)
    )
    thoughts = [p.text for c in chunks for p in c.candidates[0].content.parts if p.thought]
    assert "".join(thoughts) == thought.text
    hidden = client.models.generate_content(model="lm-think", contents="Say something")
    assert not any(p.thought for p in hidden.candidates[0].content.parts)
    assert hidden.usage_metadata.thoughts_token_count == 4


def test_gemini_json(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    typed = types.GenerateContentConfig(response_mime_type="application/json", response_schema=City)
    answer = client.models.generate_content(model="lm", contents="A city", config=typed)
    assert answer.parsed == City(name="alpha", population=1)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    loose = types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=schema
    )
    assert json.loads(client.models.generate_content(model="lm", contents="x", config=loose).text) == {
        "ok": True
    }


def test_gemini_safety(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    blocked = client.models.generate_content(model="refuse", contents="Say something")
    assert blocked.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert not blocked.candidates and blocked.text is None
    finished = client.models.generate_content(model="lm-safety-finish", contents="Say something")
    assert finished.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert any(r.blocked for r in finished.candidates[0].safety_ratings)
    recited = client.models.generate_content(model="recitation", contents="Say something")
    assert recited.candidates[0].finish_reason == types.FinishReason.RECITATION


def test_gemini_errors(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    with pytest.raises(genai_errors.ClientError) as exhausted:
        client.models.generate_content(model="resource-exhausted", contents="x")
    assert exhausted.value.code == 429 and exhausted.value.status == "RESOURCE_EXHAUSTED"
    retry = [d for d in exhausted.value.details["error"]["details"] if d["@type"].endswith("RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
    with pytest.raises(genai_errors.ClientError) as limited:
        client.models.generate_content(model="status-429", contents="x")
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(genai_errors.ServerError) as broken:
        client.models.generate_content(model="status-503", contents="x")
    assert broken.value.code == 503 and broken.value.status == "UNAVAILABLE"
    with pytest.raises(genai_errors.ClientError, match=r"The input token count \(\d+\) exceeds") as long:
        client.models.generate_content(model="context-400", contents="x")
    assert long.value.status == "INVALID_ARGUMENT"
    impatient = gm(fake_gemini, timeout_ms=500)
    with pytest.raises(httpx2.ReadTimeout):  # httpx2's, through the SDK unwrapped
        impatient.models.generate_content(model="hang", contents="x")
    url = f"{fake_gemini}/v1beta/models/ok:generateContent"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    assert httpx.post(url, json=body).json()["error"]["status"] == "PERMISSION_DENIED"
    in_url = httpx.post(url, params={"key": "k"}, json=body, headers={"x-goog-api-key": "k"})
    assert in_url.status_code == 400


def test_gemini_cut_streams(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    cut = list(client.models.generate_content_stream(model="truncated", contents="x"))
    assert cut[-1].candidates[0].finish_reason is None  # no final chunk: not noticed
    with pytest.raises(genai_errors.ServerError) as inband:
        list(client.models.generate_content_stream(model="stream-error", contents="x"))
    assert inband.value.code == 503
    with pytest.raises(httpx2.RemoteProtocolError):
        list(client.models.generate_content_stream(model="reset-after-1", contents="x"))
    with pytest.raises(genai_errors.UnknownApiResponseError):
        list(client.models.generate_content_stream(model="malformed", contents="x"))


# --- Tools, on each fake ---------------------------------------------------------------------

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}


def test_openai_tool_calls_round_trip(fake_openai_chat: str) -> None:
    client = oa(fake_openai_chat)
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": WEATHER_SCHEMA}},
        {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}},
    ]
    done = client.chat.completions.create(model="lm", messages=USER, tools=tools)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [c.function.name for c in message.tool_calls] == ["weather", "time"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    one = client.chat.completions.create(
        model="lm", messages=USER, tools=tools, parallel_tool_calls=False
    )
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["weather"]
    named = client.chat.completions.create(
        model="lm",
        messages=USER,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "time"}},
    )
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["time"]
    with client.chat.completions.stream(model="lm", messages=USER, tools=tools) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in streamed] == [
        (c.id.replace(c.id[-6:-2], c.id[-6:-2]), c.function.name, c.function.arguments) for c in streamed
    ]
    assert [c.function.arguments for c in streamed] == [c.function.arguments for c in message.tool_calls]
    assert final.choices[0].finish_reason == "tool_calls"
    history = [
        *USER,
        message.model_dump(exclude_none=True),
        *(
            {"role": "tool", "tool_call_id": c.id, "content": f"result {k}"}
            for k, c in enumerate(message.tool_calls)
        ),
    ]
    answer = client.chat.completions.create(model="lm", messages=history, tools=tools)
    assert answer.choices[0].message.content == "The tools said: result 0; result 1"


def test_anthropic_tool_use_round_trip_with_thinking(fake_anthropic: str) -> None:
    client = an(fake_anthropic)
    tools = [{"name": "weather", "input_schema": WEATHER_SCHEMA}]
    args = {"model": "lm-think", "max_tokens": 2048, "tools": tools, "thinking": THINK}
    message = client.messages.create(**args, messages=USER)
    assert message.stop_reason == "tool_use"
    thinking, use = message.content
    assert thinking.type == "thinking" and thinking.signature == SIGNATURE
    assert use.type == "tool_use" and use.name == "weather" and use.input == {"city": "Paris"}
    with client.messages.stream(**args, messages=USER) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[1].input == {"city": "Paris"}
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22C"}],
    }
    turn = {"role": "assistant", "content": [b.model_dump() for b in message.content]}
    answer = client.messages.create(**args, messages=[*USER, turn, result])
    assert answer.content[-1].text == "The tools said: 22C" and answer.stop_reason == "end_turn"
    without = {"role": "assistant", "content": [use.model_dump()]}  # its thinking dropped
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        client.messages.create(**args, messages=[*USER, without, result])
    unanswered = [*USER, turn, {"role": "user", "content": "and?"}]
    with pytest.raises(anthropic.BadRequestError, match="tool_result"):
        client.messages.create(**args, messages=unanswered)


def test_gemini_function_calls_round_trip_with_signatures(fake_gemini: str) -> None:
    client = gm(fake_gemini)
    weather = types.FunctionDeclaration(name="weather", parameters_json_schema=WEATHER_SCHEMA)
    config = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[weather])])
    answer = client.models.generate_content(model="lm-think", contents="Say something", config=config)
    (part,) = answer.candidates[0].content.parts
    assert part.function_call.name == "weather" and part.function_call.args == {"city": "Paris"}
    assert part.thought_signature and answer.candidates[0].finish_reason == types.FinishReason.STOP
    chunks = list(
        client.models.generate_content_stream(model="lm-think", contents="Say something", config=config)
    )
    assert chunks[-1].candidates[0].content.parts[0].function_call.name == "weather"
    user = types.Content(role="user", parts=[types.Part(text="Say something")])
    result = types.Content(
        role="user",
        parts=[types.Part.from_function_response(name="weather", response={"result": "22C"})],
    )
    spoken = client.models.generate_content(
        model="lm-think", contents=[user, answer.candidates[0].content, result], config=config
    )
    assert spoken.text == "The tools said: 22C"
    unsigned = types.Content(role="model", parts=[types.Part(function_call=part.function_call)])
    with pytest.raises(genai_errors.ClientError, match="thought_signature"):
        client.models.generate_content(
            model="lm-think", contents=[user, unsigned, result], config=config
        )
