"""The conformance matrix: every request parameter of the spec, against every kind of deployment.

Each row is a parameter case; each column a deployment kind: (a) the embedded llama.cpp engine,
(b) an OpenAI-compatible upstream that has the parameter (the `lm` fake), (c) one that lacks it
(`lm-no-X`, which answers 400 if it is sent X, so an emulation that leaks fails), and (d)
llama-cpp-python's own server as configured in the tests. Each cell says what happens -- native,
emulated (by llmrouter), rejected (a 400 naming the parameter), llmrouter (a field the router
itself honours) -- and each cell is a test here. The same table is in docs/parameters.md; a test
checks that the two agree.
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

Check = Callable[[dict[str, Any], dict[str, Any]], None]  # (answer, request body)

COLUMNS = (
    "llamacpp",
    "openai",
    "openai lacking it",
    "llama-cpp-python server",
    "openai_chat",
    "anthropic",
    "gemini",
)
N, E, R, L, NA = "native", "emulated", "rejected", "llmrouter", "—"


@dataclass(frozen=True)
class Row:
    name: str  # as in the docs table
    param: str  # the request field it is about (what a 400 names, what X-Llmrouter-Emulated says)
    body: dict[str, Any]
    cells: tuple[str, ...]  # one per column
    check: Check = lambda answer, body: None
    lacking: str = ""  # the lm-no-X variant for column (c); default: `param`
    models: dict[str, str] = field(default_factory=dict)  # per-column model, when not the default
    # Fields of the request left out for a column (one the kind lacks, so that the cell is about
    # `param`), and the parameter a column's 400 names where the kind lacks another of the row's
    # (Anthropic has no logprobs, so `echo` with logprobs is refused for `logprobs`).
    drop: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refused_for: dict[str, str] = field(default_factory=dict)


def _choices(count: int) -> Check:
    def check(answer: dict[str, Any], body: dict[str, Any]) -> None:
        assert [c["index"] for c in answer["choices"]] == list(range(count))

    return check


def _echoes(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["text"].startswith(body.get("prompt", PROMPT))


def _echoes_scored(answer: dict[str, Any], body: dict[str, Any]) -> None:
    _echoes(answer, body)
    lp = answer["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == answer["choices"][0]["text"]


def _logprobs(k: int) -> Check:
    def check(answer: dict[str, Any], body: dict[str, Any]) -> None:
        choice = answer["choices"][0]
        lp = choice["logprobs"]
        count = len(lp["tokens"])
        assert count == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert count == answer["usage"]["completion_tokens"] or choice["finish_reason"] == "stop"
        assert all(len(top) <= k for top in lp["top_logprobs"])
        assert all(len(top) == k for top in lp["top_logprobs"][:-1])
        for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
            assert choice["text"][offset:].startswith(token)

    return check


def _echo_only(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["text"] == body["prompt"]
    assert answer["usage"]["completion_tokens"] == 0


def _cut_by_length(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] >= 1


def _at_most(tokens: int) -> Check:
    def check(answer: dict[str, Any], body: dict[str, Any]) -> None:
        assert answer["usage"]["completion_tokens"] <= tokens

    return check


def _no_stops(answer: dict[str, Any], body: dict[str, Any]) -> None:
    for choice in answer["choices"]:
        assert not any(stop in choice["text"] for stop in body["stop"]), choice


def _finished(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


def _has_usage(answer: dict[str, Any], body: dict[str, Any]) -> None:
    usage = answer["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def _json_object(answer: dict[str, Any], body: dict[str, Any]) -> None:
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["text"]), dict)


def _json_schema(answer: dict[str, Any], body: dict[str, Any]) -> None:
    import jsonschema

    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["text"]), body["response_format"]["json_schema"]["schema"])


def _yes_or_no(answer: dict[str, Any], body: dict[str, Any]) -> None:
    assert answer["choices"][0]["text"] in ("yes", "no")


def _python(answer: dict[str, Any], body: dict[str, Any]) -> None:
    ast.parse(answer["choices"][0]["text"])


def _reasoning(answer: dict[str, Any], body: dict[str, Any]) -> None:
    choice = answer["choices"][0]
    assert choice["reasoning"], choice
    assert "<think>" not in choice["text"] and "</think>" not in choice["text"]


PROMPT = "The capital of France is"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
# Few-shot: a model this small rambles on, adding keys, when only told to answer in JSON.
ASK_JSON = '{"country": "Germany", "city": "Berlin"}\n{"country": "Italy", "city": "Rome"}\n'

LONG = "hello " * 2030  # nearly fills a 2,048-token context

ROWS = [
    Row("prompt: a string", "prompt", {}, (N, N, NA, N, E, E, E), _choices(1)),
    Row(
        "prompt: a batch of strings",
        "prompt",
        {"prompt": ["One", "Two"]},
        (N, N, E, E, E, E, E),
        _choices(2),
    ),
    Row(
        "prompt: token ids",
        "prompt",
        {"prompt": [[504, 3458], [28]]},
        (N, N, R, R, R, R, R),
        _choices(2),
    ),
    Row("model, models", "models", {"models": ["lm/full"]}, (L, L, NA, L, L, L, L), _choices(1)),
    Row("provider", "provider", {"provider": {"allow_fallbacks": False}}, (L, L, NA, L, L, L, L)),
    Row(
        "best_of",
        "best_of",
        {"best_of": 3, "n": 2, "temperature": 1.0, "seed": 4},
        (E, N, E, E, E, R, E),
        _choices(2),
        drop={"anthropic": ("seed",)},
    ),
    Row("echo", "echo", {"echo": True}, (E, E, E, E, E, E, E), _echoes),
    Row(
        "echo with logprobs",
        "echo",
        {"echo": True, "logprobs": 1},
        (N, N, R, R, R, R, R),
        _echoes_scored,
        refused_for={"anthropic": "logprobs"},
    ),
    Row("frequency_penalty", "frequency_penalty", {"frequency_penalty": 1.0}, (N, N, R, N, N, R, N)),
    Row("presence_penalty", "presence_penalty", {"presence_penalty": 1.0}, (N, N, R, N, N, R, N)),
    Row("logit_bias", "logit_bias", {"logit_bias": {"11": -100}}, (N, N, R, N, N, R, R)),
    Row("logprobs", "logprobs", {"logprobs": 2}, (N, N, R, N, N, R, N), _logprobs(2)),
    Row("max_tokens", "max_tokens", {"max_tokens": 3}, (N, N, NA, N, N, N, N), _at_most(3)),
    Row(
        "max_tokens: 0 (with echo)",
        "max_tokens",
        {"max_tokens": 0, "echo": True},
        (N, N, R, R, R, R, R),
        _echo_only,
        lacking="max_tokens_zero",
    ),
    Row(
        "max_tokens: null",
        "max_tokens",
        {"prompt": LONG, "max_tokens": None},
        (N, N, NA, N, N, N, N),
        _cut_by_length,
    ),
    Row(
        "n",
        "n",
        {"n": 2, "temperature": 1.0, "seed": 3},
        (N, N, E, E, N, E, N),
        _choices(2),
        drop={"anthropic": ("seed",)},
    ),
    Row("seed", "seed", {"seed": 5, "temperature": 1.0}, (N, N, R, N, N, R, N)),
    Row("stop", "stop", {"stop": ["e", "a"], "max_tokens": 8}, (N, N, E, N, N, N, N), _no_stops),
    Row("stream", "stream", {"stream": True}, (N, N, E, N, N, N, N), _finished),
    Row(
        "stream_options: include_usage",
        "stream_options",
        {"stream": True, "stream_options": {"include_usage": True}},
        (N, N, E, E, N, N, N),
        _has_usage,
    ),
    Row(
        "suffix (the embedded model: no FIM tokens)",
        "suffix",
        {"suffix": " and that is all."},
        (R, N, R, R, R, R, R),
    ),
    Row(
        "suffix (a model with FIM tokens)",
        "suffix",
        {"suffix": " and that is all."},
        (N, N, R, R, R, R, R),
        _finished,
        models={"llamacpp": "local/smollm2-fim"},
    ),
    Row("temperature", "temperature", {"temperature": 0.7}, (N, N, R, N, N, N, N)),
    Row("top_p", "top_p", {"top_p": 0.5, "temperature": 1.0}, (N, N, R, N, N, N, N), lacking="top_p"),
    Row("user", "user", {"user": "end-user-7"}, (L, L, NA, L, L, L, L)),
    Row("metadata", "metadata", {"metadata": {"team": "search"}}, (L, L, NA, L, L, L, L)),
    Row(
        "response_format: json_object",
        "response_format",
        {"response_format": {"type": "json_object"}, "prompt": ASK_JSON, "max_tokens": 200},
        (N, N, E, N, N, E, N),
        _json_object,
    ),
    Row(
        "response_format: json_schema",
        "response_format",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": SCHEMA},
            },
            "prompt": ASK_JSON,
            "max_tokens": 200,
        },
        (N, N, E, N, N, E, E),
        _json_schema,
    ),
    Row(
        "response_format: grammar",
        "response_format",
        {"response_format": {"type": "grammar", "grammar": 'root ::= "yes" | "no"'}},
        (N, N, R, N, R, R, R),
        _yes_or_no,
    ),
    Row(
        "response_format: python",
        "response_format",
        {
            "response_format": {"type": "python"},
            "prompt": "x = 1\ny = x + 2\n",
            "stop": ["\n"],
            "max_tokens": 30,
        },
        (E, E, E, E, E, E, E),
        _python,
    ),
    Row(
        "reasoning (in the answer)",
        "reasoning",
        {"prompt": "Question: 2+2?\n<think>", "max_tokens": 6},
        (L, L, NA, L, L, L, L),
        _reasoning,
        models={
            "openai": "lm/think",
            "openai_chat": "oc/think",
            "anthropic": "claude/think",
            "gemini": "gem/think",
        },
        drop={"anthropic": ("temperature",)},  # thinking takes no temperature but 1
    ),
]

DEFAULT_MODEL = {
    "llamacpp": "local/smollm2-135m-instruct",
    "openai": "lm/full",
    "llama-cpp-python server": "upstream/smollm2",
    "openai_chat": "oc/lm",
    "anthropic": "claude/lm",
    "gemini": "gem/lm",
}
# For the chat kinds, where each fake finds a native parameter in what it was sent, in the kind's
# own terms (a path into the request body).
WIRE = {
    "openai_chat": {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"},
    "anthropic": {"stop": "stop_sequences", "response_format": "output_config.format"},
    "gemini": {
        "frequency_penalty": "generationConfig.frequencyPenalty",
        "presence_penalty": "generationConfig.presencePenalty",
        "logprobs": "generationConfig.logprobs",
        "max_tokens": "generationConfig.maxOutputTokens",
        "n": "generationConfig.candidateCount",
        "seed": "generationConfig.seed",
        "stop": "generationConfig.stopSequences",
        "temperature": "generationConfig.temperature",
        "top_p": "generationConfig.topP",
        "response_format": "generationConfig.responseMimeType",
    },
}
FAKE_OF = {"openai_chat": "fake_openai_chat", "anthropic": "fake_anthropic", "gemini": "fake_gemini"}


def _model(row: Row, column: str) -> str:
    if column in row.models:
        return row.models[column]
    if column == "openai lacking it":
        return f"lm/no-{row.lacking or row.param}"
    return DEFAULT_MODEL[column]


CELLS = [
    pytest.param(row, column, id=f"{row.name} | {column}")
    for row in ROWS
    for column, cell in zip(COLUMNS, row.cells, strict=True)
    if cell != NA
]


@pytest.mark.parametrize(("row", "column"), CELLS)
def test_cell(router: Router, request: pytest.FixtureRequest, row: Row, column: str) -> None:
    fake_upstream: str = request.getfixturevalue(FAKE_OF.get(column, "fake_upstream"))
    cell = row.cells[COLUMNS.index(column)]
    body = {
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0.0,
        **row.body,
        "model": _model(row, column),
    }
    for name in row.drop.get(column, ()):
        del body[name]
    httpx.post(f"{fake_upstream}/_reset")
    status, answer, headers = ask(router, body)
    if cell == R:
        assert status == 400, answer
        assert answer["error"]["param"] == row.refused_for.get(column, row.param)
        assert answer["error"]["code"] == "unsupported_parameter"
        return
    assert status == 200, answer
    row.check(answer, body)
    emulated = [p.strip() for p in headers.get("x-llmrouter-emulated", "").split(",") if p.strip()]
    if cell == E:
        assert row.param in emulated, emulated
    else:
        assert row.param not in emulated, emulated
    sent = httpx.get(f"{fake_upstream}/_stats").json()["last_body"]
    if column == "openai" and cell == N:
        assert row.param in sent, sent  # passed on as it is
    if column in ("openai", *WIRE) and cell == L:
        assert row.param not in sent, sent  # the router's own
    asked = row.body.get(row.param, True) is not None  # (null asks for no limit: nothing is sent)
    if column in WIRE and cell == N and asked and row.param not in ("stream", "stream_options"):
        assert _at(sent, WIRE[column].get(row.param, row.param)) is not None, sent  # in its terms


def _at(body: dict[str, Any], path: str) -> Any:
    for step in path.split("."):
        body = body.get(step) if isinstance(body, dict) else None  # type: ignore[assignment]
    return body


def test_seed_gives_the_same_text_again(router: Router) -> None:
    for model in ("local/smollm2-135m-instruct", "lm/full", "upstream/smollm2"):
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 11}
        texts = {ask(router, body)[1]["choices"][0]["text"] for _ in range(3)}
        assert len(texts) == 1, (model, texts)


def test_derived_seeds_make_fanned_out_choices_differ_and_repeat(router: Router) -> None:
    body = {"model": "lm/no-n", "prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "n": 3, "seed": 9}
    first = [c["text"] for c in ask(router, body)[1]["choices"]]
    again = [c["text"] for c in ask(router, body)[1]["choices"]]
    assert first == again
    assert len(set(first)) > 1


def test_best_of_returns_the_candidates_with_the_best_mean_logprob(router: Router) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 2, "logprobs": 0}
    native = ask(router, {**body, "model": "lm/full", "n": 1, "best_of": 5})[1]["choices"]
    emulated = ask(router, {**body, "model": "lm/no-best_of", "n": 1, "best_of": 5})[1]["choices"]
    # every candidate, to see which is best
    candidates = ask(router, {**body, "model": "lm/no-best_of", "n": 5})[1]["choices"]

    def mean(choice: dict[str, Any]) -> float:
        values = choice["logprobs"]["token_logprobs"]
        return sum(values) / len(values)

    assert len(native) == len(emulated) == 1
    assert mean(emulated[0]) == max(mean(c) for c in candidates)
    assert emulated[0]["text"] == max(candidates, key=mean)["text"]


def test_invalid_structured_output_is_asked_for_again_then_fails_clearly(router: Router) -> None:
    body = {"prompt": "x", "response_format": {"type": "json_object"}}
    r = httpx.post(
        f"{router.api}/completions", headers=router.headers(), json={**body, "model": "lm/json-second"}
    )
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["text"]) == {"ok": True}
    attempts = r.headers["x-llmrouter-attempts"].split(", ")
    assert [a.split()[1] for a in attempts] == ["invalid_output", "ok"]
    # deterministic (temperature 0, or a seed): asked again it would say the same, so it is not
    r = httpx.post(
        f"{router.api}/completions",
        headers=router.headers(),
        json={**body, "model": "lm/json-second", "temperature": 0},
    )
    assert r.status_code == 502 and r.headers["x-llmrouter-attempts"].count("invalid_output") == 1
    r = httpx.post(
        f"{router.api}/completions", headers=router.headers(), json={**body, "model": "lm/never-json"}
    )
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "invalid_output"
    # then the next model in `models`
    r = httpx.post(
        f"{router.api}/completions",
        headers=router.headers(),
        json={**body, "model": "lm/never-json", "models": ["lm/full"]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "lm/full"
    outcomes = [a.split()[1] for a in r.headers["x-llmrouter-attempts"].split(", ")]
    assert outcomes == ["invalid_output", "invalid_output", "ok"]


def test_reasoning_is_split_off_in_streams_too(router: Router) -> None:
    body = {"model": "lm/think", "prompt": "Why?", "max_tokens": 3, "seed": 1, "stream": True}
    streamed = ask(router, body)[1]["choices"][0]
    complete = ask(router, {**body, "stream": False})[1]["choices"][0]
    assert streamed["reasoning"] == complete["reasoning"] == "pondering deeply"
    assert streamed["text"] == complete["text"] and complete["text"] and "think>" not in complete["text"]


def test_an_emulated_stop_cuts_inside_a_token_and_across_chunks(router: Router) -> None:
    # lm's words run " alpha beta gamma ...": "ta gam" begins inside " beta" and ends in " gamma"
    for seed in range(20):  # a seed whose answer has " beta gamma" in it
        body = {
            "model": "lm/no-stop",
            "prompt": "Hi",
            "max_tokens": 12,
            "seed": seed,
            "temperature": 0.0,
        }
        free = ask(router, body)[1]["choices"][0]["text"]
        if "ta gam" in free:
            break
    assert "ta gam" in free
    expected = free[: free.index("ta gam")]
    for stream in (False, True):
        status, answer, headers = ask(router, {**body, "stop": ["ta gam"], "stream": stream})
        assert status == 200
        assert answer["choices"][0]["text"] == expected
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert headers["x-llmrouter-emulated"] == "stop"


def test_a_streamed_answer_that_must_be_checked_fails_before_the_stream_begins(router: Router) -> None:
    body = {"prompt": "x", "response_format": {"type": "json_object"}, "stream": True}
    status, answer, _ = ask(router, {**body, "model": "lm/never-json"})
    assert status == 502 and answer["error"]["type"] == "invalid_output"
    status, answer, headers = ask(router, {**body, "model": "lm/json-second"})
    assert status == 200 and json.loads(answer["choices"][0]["text"]) == {"ok": True}
    assert headers["x-llmrouter-emulated"] == "response_format"


def test_the_local_engine_constrains_a_schema_llama_cpps_converter_would_ignore(router: Router) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"year": {"type": "integer", "minimum": 2000, "maximum": 3999}},
        "required": ["year"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "y", "schema": schema}}
    body = {
        "model": "local/smollm2-135m-instruct",
        "prompt": "Year:\n",
        "max_tokens": 40,
        "temperature": 0.0,
    }
    status, answer, headers = ask(router, {**body, "response_format": fmt})
    assert status == 200, answer
    jsonschema.validate(json.loads(answer["choices"][0]["text"]), schema)
    assert "x-llmrouter-emulated" not in headers  # constrained by the engine, right first time


def test_anthropic_and_gemini_constrain_to_a_schema_they_take(
    router: Router, fake_anthropic: str, fake_gemini: str
) -> None:
    """The matrix's schema bounds a string's length, which neither takes natively (so there it
    is checked); one they do take is sent as their own structured output."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    for model, fake, where in (
        ("claude/lm", fake_anthropic, ("output_config", "format")),
        ("gem/lm", fake_gemini, ("generationConfig", "responseJsonSchema")),
    ):
        body = {"model": model, "prompt": ASK_JSON, "max_tokens": 200, "response_format": fmt}
        status, answer, headers = ask(router, body)
        assert status == 200, answer
        jsonschema.validate(json.loads(answer["choices"][0]["text"]), schema)
        assert (
            "x-llmrouter-emulated" not in headers
            or "response_format" not in headers["x-llmrouter-emulated"]
        )
        sent = httpx.get(f"{fake}/_stats").json()["last_body"]
        assert sent[where[0]][where[1]], sent
