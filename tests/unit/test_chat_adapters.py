"""The chat endpoint's translations, in process: each kind's tools, carried thinking and
signatures, names and images, against a MockTransport; the chat template's segments; the credit
hold's estimate of a conversation."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest

from llmrouter.api.chat import CHAT as CHAT_WIRE
from llmrouter.api.chat import messages_tokens_bound
from llmrouter.errors import InvalidRequest
from llmrouter.generation import Generation, Message, from_chat
from llmrouter.providers import anthropic, gemini
from llmrouter.providers._chat_template import ChatTemplate, read_calls
from llmrouter.providers._common import carried, own_id
from llmrouter.providers.anthropic import AnthropicAdapter
from llmrouter.providers.base import Call
from llmrouter.providers.openai_chat import OpenAIChatAdapter
from llmrouter.settings import DeploymentSettings, Timeouts
from llmrouter.wire.tools import FunctionCall, ToolCall
from llmrouter.wire.validate import decode_chat_request
from tests.unit.test_adapters import CHAT, CLAUDE, adapter, complete, ok, sent, sse, stream


def chat_call(**body: Any) -> Call:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    _, request = from_chat(decode_chat_request(msgspec.json.encode(body)))
    return Call(DeploymentSettings(provider="p", model="m"), request, Timeouts(first_token=2, idle=2))


def carried_blocks(blocks: list[dict[str, Any]]) -> str:
    return "toolu_1~a." + base64.urlsafe_b64encode(json.dumps(blocks).encode()).decode().rstrip("=")


def history(call_id: str, arguments: str = "{}") -> list[dict[str, Any]]:
    call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "done"},
    ]


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_an_id_carries_back_thinking_blocks_only() -> None:
    thought = {"type": "thinking", "thinking": "hmm", "signature": "SIG"}
    smuggled = {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}
    for blocks, kept in (([thought], [thought]), ([smuggled], []), ([thought, smuggled], [])):
        a, u = adapter(AnthropicAdapter, CLAUDE, ok({"type": "message", "content": []}))
        complete(a, chat_call(messages=history(carried_blocks(blocks)), tools=TOOLS))
        turn = sent(u)["messages"][1]["content"]
        assert [b for b in turn if b["type"] != "tool_use"] == kept
        assert turn[-1]["id"] == "toolu_1"  # the API's own id, whatever came after it


def test_another_kinds_carried_part_is_never_sent() -> None:
    signed = "call_1~g.c2lnbmF0dXJl"  # Gemini's thought signature, carried
    contents = gemini._contents(
        [Message("assistant", "", (ToolCall(id=carried_blocks([]), function=FunctionCall("f", "{}")),))]
    )
    assert "thoughtSignature" not in contents[0]["parts"][0]  # an Anthropic id on Gemini
    contents = gemini._contents(
        [Message("assistant", "", (ToolCall(id=signed, function=FunctionCall("f", "{}")),))]
    )
    assert contents[0]["parts"][0]["thoughtSignature"] == "c2lnbmF0dXJl"
    a, u = adapter(OpenAIChatAdapter, CHAT, ok({"choices": []}))
    complete(a, chat_call(messages=history(signed), tools=TOOLS))
    messages = sent(u)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_1" and messages[2]["tool_call_id"] == "call_1"


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
def test_arguments_nested_past_reading_are_a_400(kind: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    call = chat_call(messages=history("call_1", deep), tools=TOOLS)
    translate = anthropic._turns if kind == "anthropic" else gemini._contents
    with pytest.raises(InvalidRequest) as caught:
        translate(list(call.request.messages))
    assert caught.value.param == "messages"
    assert gemini._response_object(deep) == {"result": deep}  # a result is text, as it is
    assert anthropic._uncarried("toolu_1~a." + base64.urlsafe_b64encode(deep.encode()).decode()) == (
        "toolu_1",
        [],
    )


def test_a_streamed_anthropic_call_without_input_has_arguments_of_an_empty_object() -> None:
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}},
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ]
    a, _ = adapter(AnthropicAdapter, CLAUDE, ok(sse(*events, named=True)))
    parts = stream(a, chat_call(tools=TOOLS, stream=True))
    deltas = [d for p in parts for c in p.choices for d in c.tool_calls or []]
    assert "".join(d.function.arguments for d in deltas) == "{}"  # type: ignore[union-attr]
    assert parts[-1].choices[0].finish_reason == "tool_calls"


def test_a_name_goes_where_the_api_takes_one() -> None:
    a, u = adapter(OpenAIChatAdapter, CHAT, ok({"choices": []}))
    complete(a, chat_call(messages=[{"role": "user", "content": "Hi", "name": "ann"}]))
    assert sent(u)["messages"][0] == {"role": "user", "content": "Hi", "name": "ann"}


def test_a_developer_message_is_a_system_message_to_a_template() -> None:
    template = ChatTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    rendered = template.render([Message("developer", "Speak French."), Message("user", "Hi")])
    assert rendered == "[system] Speak French.\n[user] Hi\n"


def test_a_template_that_rewrites_its_markers_has_no_segments() -> None:
    shouting = ChatTemplate("{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    assert shouting.segments([Message("user", "hi")]) is None
    plain = ChatTemplate("<s>{% for m in messages %}{{ m.content }}</s>{% endfor %}")
    segments = plain.segments([Message("user", "a\x00b<s>")])  # (a NUL is text like any other)
    assert segments is not None
    assert [(s.text, s.template) for s in segments] == [
        ("<s>", True),
        ("a\x00b<s>", False),
        ("</s>", True),
    ]


@pytest.mark.parametrize(
    "url",
    [
        "data:image/svg+xml;base64,PHN2Zz4=",
        "data:image/png;base64,@@@ not base64",
        "data:image/png;base64,YQ",
    ],
)
def test_an_image_that_no_api_takes_is_a_400_at_the_edge(url: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(InvalidRequest) as caught:
        chat_call(messages=[{"role": "user", "content": content}])
    assert caught.value.param == "messages[0].content[0]"


def test_the_credit_bound_counts_tools_calls_and_images() -> None:
    plain = Generation(messages=(Message("user", "Hi"),))
    schema = {"type": "object", "description": "x" * 10_000}
    with_tools = chat_call(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
    assert messages_tokens_bound(with_tools.request) >= messages_tokens_bound(plain) + 10_000
    called = chat_call(messages=history("call_1", json.dumps({"text": "y" * 5000})), tools=TOOLS)
    assert messages_tokens_bound(called.request) >= 5000
    pixel = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5Er"
        "kJggg=="
    )
    image = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}}]
    looked = chat_call(messages=[{"role": "user", "content": image}])
    assert messages_tokens_bound(looked.request) >= 1600


# -- a second review: tools through a chat template ----------------------------------------------


@pytest.mark.timeout(20)
def test_reading_calls_is_one_pass_over_any_text() -> None:
    names = frozenset({"weather"})
    for text in ("<tool_call>" + " " * 50_000, "<tool_call>\n" * 20_000, "<tool_call>" * 50_000):
        assert read_calls(text, names) == (text, [])  # (the old regex took minutes on these)


def test_only_calls_to_declared_functions_with_object_arguments_are_read() -> None:
    names = frozenset({"weather"})
    text = (
        'Example: <tool_call>{"name": "rm -rf", "arguments": 5}</tool_call> '
        '<tool_call>{"name": "weather", "arguments": null}</tool_call> '
        '<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'
    )
    said, calls = read_calls(text, names)
    assert calls == [("weather", '{"city": "Paris"}')]
    assert said.startswith('Example: <tool_call>{"name": "rm -rf"') and "null" in said


def test_xml_calling_templates_are_not_read_as_hermes() -> None:
    hermes = ChatTemplate(
        "{% if tools %}{{ tools | tojson }}{% endif %}<tool_call>{{ messages[-1].content }}"
    )
    xml = ChatTemplate("{% if tools %}<tool_call><function=x>{% endif %}{{ messages[-1].content }}")
    assert hermes.calls_tools and not xml.calls_tools


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}[INST] {{ m.content | trim }} [/INST]{% endfor %}",
        "{% for m in messages %}<|{{ m.role }}|>{% if m.content %}\\n{{ m.content }}{% endif %}"
        "\\n{% endfor %}",
        "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\\n{% endfor %}",
    ],
)
def test_segments_join_to_the_rendering(source: str) -> None:
    """Cut apart, the prompt is the template's own rendering, its spaces and branches kept (an
    empty message is rendered empty, as templates test)."""
    template = ChatTemplate(source)
    messages = [Message("user", "  hello "), Message("assistant", ""), Message("user", "bye")]
    segments = template.segments(messages)
    assert segments is not None
    assert "".join(s.text for s in segments) == template.render(messages)


def test_a_clients_own_id_is_kept_whole() -> None:
    assert own_id("x~1") == "x~1" and own_id("toolu_1~a.e30") == "toolu_1"
    assert carried("call_1~g.c2ln", "g") == ("call_1", "c2ln")
    assert carried("call_1~g.c2ln", "a") == ("call_1", None)


def test_the_credit_hold_counts_what_an_answer_may_think() -> None:
    def thinking(reasoning: dict[str, Any]) -> int:
        body = {"messages": [{"role": "user", "content": "Hi"}], "reasoning": reasoning}
        return CHAT_WIRE.decode(json.dumps(body).encode()).thinking

    assert thinking({"max_tokens": 5000}) == 5000
    assert thinking({"max_tokens": 10}) == 1024  # (raised to the least a kind takes)
    assert thinking({"effort": "high"}) == thinking({"enabled": True}) == 32000
    assert thinking({"enabled": False, "effort": "high"}) == 0
    assert thinking({"exclude": True}) == 0
