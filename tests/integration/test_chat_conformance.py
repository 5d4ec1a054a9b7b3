"""The chat conformance matrix: every field of a chat request, against every kind of deployment,
through POST /chat/completions.

Columns: (a) the embedded engine, which takes a conversation through its GGUF's chat template,
(b) llama-cpp-python's server as an upstream of the completions kind, the template in its
config, and (c-e) the chat kinds, each against its SDK-checked fake. Each cell says what happens:
native (passed on, in the kind's terms), template (the conversation rendered by the model's chat
template), emulated (by llmrouter: `X-Llmrouter-Emulated` says so), rejected (a 400 naming the
field), llmrouter (the router's own field). Each cell is a test here; docs/chat-parameters.md
holds the same table, and tests/unit/test_docs.py checks that the two agree.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import Router, ask
from tests.integration.test_conformance import _at, _at_most

Check = Callable[[dict[str, Any], dict[str, Any]], None]  # (answer, request body)

COLUMNS = ("llamacpp", "llama-cpp-python server", "openai_chat", "anthropic", "gemini")
N, T, E, R, L = "native", "template", "emulated", "rejected", "llmrouter"
DEFAULT_MODEL = {
    "llamacpp": "local/smollm2-135m-instruct",
    "llama-cpp-python server": "upstream/smollm2",
    "openai_chat": "oc/lm",
    "anthropic": "claude/lm",
    "gemini": "gem/lm",
}
FAKE_OF = {"openai_chat": "fake_openai_chat", "anthropic": "fake_anthropic", "gemini": "fake_gemini"}
# Where each chat kind's fake finds a native field in what it was sent (a path into its body).
WIRE = {
    "openai_chat": {
        "max_tokens": "max_completion_tokens",
        "logprobs": "top_logprobs",
        "reasoning": "reasoning_effort",
    },
    "anthropic": {
        "stop": "stop_sequences",
        "tools": "tools",
        "tool_choice": "tool_choice.type",
        "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
        "reasoning": "thinking.budget_tokens",
        "reasoning.max_tokens": "thinking.budget_tokens",
        "max_completion_tokens": "max_tokens",
    },
    "gemini": {
        "frequency_penalty": "generationConfig.frequencyPenalty",
        "presence_penalty": "generationConfig.presencePenalty",
        "logprobs": "generationConfig.logprobs",
        "max_completion_tokens": "generationConfig.maxOutputTokens",
        "max_tokens": "generationConfig.maxOutputTokens",
        "n": "generationConfig.candidateCount",
        "seed": "generationConfig.seed",
        "stop": "generationConfig.stopSequences",
        "temperature": "generationConfig.temperature",
        "top_p": "generationConfig.topP",
        "response_format": "generationConfig.responseMimeType",
        "tools": "tools",
        "tool_choice": "toolConfig.functionCallingConfig.mode",
        "reasoning": "generationConfig.thinkingConfig.thinkingLevel",
        "reasoning.max_tokens": "generationConfig.thinkingConfig.thinkingBudget",
    },
}


@dataclass(frozen=True)
class Row:
    name: str  # as in the docs table
    param: str  # the field a 400 names and X-Llmrouter-Emulated says
    body: dict[str, Any]
    cells: tuple[str, ...]  # one per column
    check: Check = lambda answer, body: None
    models: dict[str, str] = field(default_factory=dict)  # per-column model, when not the default
    drop: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fields left out per column
    refused_for: dict[str, str] = field(default_factory=dict)  # the field a column's 400 names


QUESTION = [{"role": "user", "content": "Name a colour."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
}
HISTORY = [
    {"role": "user", "content": "The weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
]
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
        ],
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
# A model this small rambles on in JSON (to the output cap: returned as it is) unless shown.
ASK_JSON = [
    {"role": "system", "content": 'Answer with one JSON object, as in {"city": "Paris"}.'},
    {"role": "user", "content": "The capital of France?"},
]
VISION = {"openai_chat": "oc/vision", "anthropic": "claude/vision", "gemini": "gem/vision"}
THINKING = {"openai_chat": "oc/think", "anthropic": "claude/think", "gemini": "gem/think"}


def _choices(count: int) -> Check:
    def check(answer: dict[str, Any], body: dict[str, Any]) -> None:
        assert [c["index"] for c in answer["choices"]] == list(range(count))

    return check


def _said(answer: dict[str, Any], body: dict[str, Any]) -> None:
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"], message


def _calls(names: list[str]) -> Check:
    def check(answer: dict[str, Any], body: dict[str, Any]) -> None:
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == names

    return check


def _quotes_the_result(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["message"]["content"] == "The tools said: 22C"


def _logprobs(k: int) -> Check:
    def check(answer: dict[str, Any], body: dict[str, Any]) -> None:
        choice = answer["choices"][0]
        content = choice["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == choice["message"]["content"]
        assert all(len(t["top_logprobs"]) == k for t in content)

    return check


def _no_stops(answer: dict[str, Any], body: dict[str, Any]) -> None:
    for choice in answer["choices"]:
        assert not any(stop in (choice["message"]["content"] or "") for stop in body["stop"]), choice


def _has_usage(answer: dict[str, Any], body: dict[str, Any]) -> None:
    usage = answer["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] >= 1


def _json_object(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)


def _json_schema(answer: dict[str, Any], body: dict[str, Any]) -> None:
    import jsonschema

    content = answer["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), body["response_format"]["json_schema"]["schema"])


def _yes_or_no(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["message"]["content"] in ("yes", "no")


def _python(answer: dict[str, Any], body: dict[str, Any]) -> None:
    ast.parse(answer["choices"][0]["message"]["content"])


def _thought(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["message"]["reasoning"]


def _unthought(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert "reasoning" not in answer["choices"][0]["message"]


ROWS = [
    Row("messages: user and assistant turns", "messages", {}, (T, T, N, N, N), _said),
    Row(
        "messages: system and developer",
        "messages",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Be kind."},
                *QUESTION,
            ]
        },
        (T, T, N, N, N),
        _said,
    ),
    Row(
        "messages: image_url (deployments with vision)",
        "messages[0].content[1]",
        {"messages": IMAGE},
        (R, R, N, N, N),
        _said,
        models=VISION,
    ),
    Row(
        "messages: tool calls and their results",
        "tools",
        {"messages": HISTORY, "tools": [TOOL], "max_tokens": 20},
        (R, R, N, N, N),
        _quotes_the_result,
    ),
    Row(
        "messages: a participant's name",
        "messages[0].name",
        {"messages": [{"role": "user", "content": "Name a colour.", "name": "ann"}]},
        (R, R, N, R, R),
        _said,
    ),
    Row("tools", "tools", {"tools": [TOOL]}, (R, R, N, N, N), _calls(["weather"])),
    Row(
        "tools: strict",
        "tools",
        {"tools": [{**TOOL, "function": {**TOOL["function"], "strict": True}}]},
        (R, R, N, N, R),
        _calls(["weather"]),
    ),
    Row(
        "tool_choice",
        "tool_choice",
        {"tools": [TOOL, CLOCK], "tool_choice": {"type": "function", "function": {"name": "clock"}}},
        (R, R, N, N, N),
        _calls(["clock"]),
        refused_for={"llamacpp": "tools", "llama-cpp-python server": "tools"},
    ),
    Row(
        "parallel_tool_calls",
        "parallel_tool_calls",
        {"tools": [TOOL, CLOCK], "parallel_tool_calls": False},
        (R, R, N, N, R),
        _calls(["weather"]),
        refused_for={"llamacpp": "tools", "llama-cpp-python server": "tools"},
    ),
    Row("model, models", "models", {"models": ["oc/lm"]}, (L, L, L, L, L), _said),
    Row("provider", "provider", {"provider": {"allow_fallbacks": False}}, (L, L, L, L, L), _said),
    Row(
        "n",
        "n",
        {"n": 2, "temperature": 1.0, "seed": 3},
        (N, E, N, E, N),
        _choices(2),
        drop={"anthropic": ("seed",)},
    ),
    Row(
        "logprobs, top_logprobs",
        "logprobs",
        {"logprobs": True, "top_logprobs": 2},
        (N, N, N, R, N),
        _logprobs(2),
        refused_for={"anthropic": "top_logprobs"},
    ),
    Row("seed", "seed", {"seed": 5, "temperature": 1.0}, (N, N, N, R, N)),
    Row("stop", "stop", {"stop": ["e", "a"], "max_tokens": 8}, (N, N, N, N, N), _no_stops),
    Row(
        "max_completion_tokens",
        "max_completion_tokens",
        {"max_completion_tokens": 3},
        (N, N, N, N, N),
        _at_most(3),
        drop={c: ("max_tokens",) for c in COLUMNS},
    ),
    Row("max_tokens", "max_tokens", {"max_tokens": 3}, (N, N, N, N, N), _at_most(3)),
    Row("temperature", "temperature", {"temperature": 0.7}, (N, N, N, N, N)),
    Row("top_p", "top_p", {"top_p": 0.5, "temperature": 1.0}, (N, N, N, N, N)),
    Row("frequency_penalty", "frequency_penalty", {"frequency_penalty": 1.0}, (N, N, N, R, N)),
    Row("presence_penalty", "presence_penalty", {"presence_penalty": 1.0}, (N, N, N, R, N)),
    Row("logit_bias", "logit_bias", {"logit_bias": {"11": -100}}, (N, N, N, R, R)),
    Row("stream", "stream", {"stream": True}, (N, N, N, N, N), _said),
    Row(
        "stream_options: include_usage",
        "stream_options",
        {"stream": True, "stream_options": {"include_usage": True}},
        (N, E, N, N, N),
        _has_usage,
    ),
    Row("user", "user", {"user": "end-user-7"}, (L, L, L, L, L)),
    Row("metadata", "metadata", {"metadata": {"team": "search"}}, (L, L, L, L, L)),
    Row(
        "response_format: json_object",
        "response_format",
        {"response_format": {"type": "json_object"}, "messages": ASK_JSON, "max_tokens": 200},
        (N, N, N, E, N),
        _json_object,
    ),
    Row(
        "response_format: json_schema",
        "response_format",
        {
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
            "messages": ASK_JSON,
            "max_tokens": 200,
        },
        (N, N, N, E, E),
        _json_schema,
    ),
    Row(
        "response_format: grammar",
        "response_format",
        {"response_format": {"type": "grammar", "grammar": 'root ::= "yes" | "no"'}},
        (N, N, R, R, R),
        _yes_or_no,
    ),
    Row(
        "response_format: python",
        "response_format",
        {
            "response_format": {"type": "python"},
            "messages": [{"role": "user", "content": "x = 1\ny = x + 2\n"}],
            "stop": ["\n"],
            "max_tokens": 30,
        },
        (E, E, E, E, E),
        _python,
    ),
    Row(
        "reasoning: effort",
        "reasoning",
        {"reasoning": {"effort": "low"}},
        (R, R, N, N, N),
        _thought,
        models=THINKING,
        drop={"anthropic": ("temperature",)},  # thinking takes no temperature but 1
    ),
    Row(
        "reasoning: max_tokens",
        "reasoning.max_tokens",
        {"reasoning": {"max_tokens": 2048}},
        (R, R, R, N, N),
        _thought,
        models=THINKING,
        drop={"anthropic": ("temperature",)},
        refused_for={"llamacpp": "reasoning", "llama-cpp-python server": "reasoning"},
    ),
    Row(
        "reasoning: exclude",
        "reasoning",
        {"reasoning": {"exclude": True}},
        (L, L, L, L, L),
        _unthought,
        models=THINKING,
        drop={"anthropic": ("temperature",)},
    ),
]


def _model(row: Row, column: str) -> str:
    return row.models.get(column, DEFAULT_MODEL[column])


CELLS = [
    pytest.param(row, column, id=f"{row.name} | {column}")
    for row in ROWS
    for column, cell in zip(COLUMNS, row.cells, strict=True)
]


@pytest.mark.parametrize(("row", "column"), CELLS)
def test_cell(router: Router, request: pytest.FixtureRequest, row: Row, column: str) -> None:
    fake = request.getfixturevalue(FAKE_OF[column]) if column in FAKE_OF else None
    cell = row.cells[COLUMNS.index(column)]
    body: dict[str, Any] = {"messages": QUESTION, "max_tokens": 4, "temperature": 0.0, **row.body}
    body["model"] = _model(row, column)
    for name in row.drop.get(column, ()):
        body.pop(name, None)
    if fake is not None:
        httpx.post(f"{fake}/_reset")
    status, answer, headers = ask(router, body, "chat/completions")
    if cell == R:
        assert status == 400, answer
        assert answer["error"]["param"] == row.refused_for.get(column, row.param), answer
        assert answer["error"]["code"] == "unsupported_parameter"
        return
    assert status == 200, answer
    row.check(answer, body)
    emulated = [p.strip() for p in headers.get("x-llmrouter-emulated", "").split(",") if p.strip()]
    if cell == E:
        assert row.param in emulated, emulated
    else:
        assert row.param not in emulated, emulated
    if fake is None:
        return
    sent = httpx.get(f"{fake}/_stats").json()["last_body"]
    if cell == L:
        assert row.param.split(".")[0] not in sent, sent  # the router's own
    elif cell == N and row.param not in ("stream", "stream_options") and "messages" not in row.param:
        where = WIRE.get(column, {}).get(row.param, row.param)
        assert _at(sent, where) is not None, (where, sent)  # in the kind's own terms
