"""The chat request on the wire (issue 14's first piece): decoded with OpenAI's rules, every bad
value a 400 naming it, and split into the same `Route` and `Generation` as /completions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmrouter.errors import InvalidRequest
from llmrouter.generation import Image, Message, from_chat
from llmrouter.wire.validate import decode_chat_request

USER = {"role": "user", "content": "x"}
ANSWER = {"role": "tool", "content": "4", "tool_call_id": "c1"}  # (to no call)


def decode(**body: Any) -> Any:
    return decode_chat_request(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}], **body}).encode()
    )


def refused(param: str, **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        decode(**body)
    assert caught.value.param == param, caught.value.message
    return caught.value


def test_a_conversation_becomes_the_neutral_request() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "developer",
            "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}],
        },
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
    ]
    body = {
        "model": "m",
        "models": ["f"],
        "max_completion_tokens": 9,
        "logprobs": True,
        "top_logprobs": 3,
    }
    body |= {"stop": ["x"], "seed": 4, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    route, request = from_chat(decode(**{**body, "messages": messages}))
    assert (route.model, route.models) == ("m", ("f",))
    assert request.messages == (
        Message("system", "Be brief."),
        Message("developer", "One\nTwo"),
        Message("user", "Hi"),
        Message("assistant", ""),
    )
    assert request.prompts == ()
    assert (request.max_tokens, request.logprobs, request.stop, request.seed, request.n) == (
        9,
        3,
        ["x"],
        4,
        2,
    )
    assert request.stream and request.include_usage


def test_output_cap_and_logprobs_as_openai_means_them() -> None:
    assert from_chat(decode())[1].max_tokens is None  # none: up to the context, not 16
    assert from_chat(decode(max_tokens=5))[1].max_tokens == 5  # the older name
    assert from_chat(decode(logprobs=True))[1].logprobs == 0  # the chosen token's, no alternatives
    assert from_chat(decode(logprobs=False))[1].logprobs is None


@pytest.mark.parametrize(
    ("param", "body"),
    [
        ("messages", {"messages": []}),
        ("messages[0].content", {"messages": [{"role": "user"}]}),
        ("messages[0].role", {"messages": [{"role": "robot", "content": "x"}]}),
        ("top_logprobs", {"top_logprobs": 2}),
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
        ("max_tokens", {"max_tokens": 5, "max_completion_tokens": 5}),
        ("tool_choice", {"tool_choice": "auto"}),
        ("parallel_tool_calls", {"parallel_tool_calls": False}),
        ("stream_options", {"stream_options": {"include_usage": True}}),
        ("stop[1]", {"stop": ["a", ""]}),
        ("logit_bias.x", {"logit_bias": {"x": 1}}),
        ("temperature", {"temperature": 3}),
        ("messages[1].tool_call_id", {"messages": [USER, ANSWER]}),
        ("gibberish", {"gibberish": 1}),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_field(param: str, body: dict[str, Any]) -> None:
    refused(param, **body)


def test_a_tool_result_answers_an_earlier_call() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    _, request = from_chat(decode(messages=messages))
    _, assistant, result = request.messages
    assert assistant.role == "assistant" and [c.function.name for c in assistant.tool_calls] == ["add"]
    assert result.role == "tool" and result.tool_call_id == "c1" and result.content == "42"
    assert result.name == "add"  # (the function it answers: some APIs want it beside the id)


def test_tools_and_how_to_call_them_are_carried() -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    _, request = from_chat(decode(tools=[tool], tool_choice="required", parallel_tool_calls=False))
    assert [t.name for t in request.tools] == ["add"] and request.tools[0].parameters == {
        "type": "object"
    }
    assert request.tool_choice == "required" and request.parallel_tool_calls is False


def test_the_reasoning_request_is_carried() -> None:
    _, request = from_chat(decode(reasoning={"effort": "low", "exclude": True}))
    assert request.reasoning is not None
    assert (request.reasoning.effort, request.reasoning.exclude) == ("low", True)


def test_images_are_carried_in_their_place_among_the_text() -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "text", "text": "and this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
    ]
    _, request = from_chat(decode(messages=[{"role": "user", "content": content}]))
    (message,) = request.messages
    first, inline, second, linked = message.parts
    assert (first, second) == ("what is this?", "and this?")
    assert message.content == "what is this?\nand this?"  # (the text alone, for text-only APIs)
    assert isinstance(inline, Image) and isinstance(linked, Image)
    assert (inline.media_type, inline.data, inline.detail) == ("image/png", "AAAA", "low")
    assert inline.param == "messages[0].content[1]" and linked.param == "messages[0].content[3]"
    assert linked.data is None and linked.url == "https://example.com/a.jpg"


@pytest.mark.parametrize(
    "url", ["data:text/plain;base64,aGk=", "data:image/png,raw", "file:///etc/passwd"]
)
def test_an_image_url_that_is_not_one_is_a_400_naming_it(url: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(InvalidRequest) as caught:
        from_chat(decode(messages=[{"role": "user", "content": content}]))
    assert caught.value.param == "messages[0].content[0]"
