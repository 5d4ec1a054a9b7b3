"""Properties over generated requests (hypothesis, bounded in examples and time), through a real
router: stop sequences never appear, streamed and complete answers agree at temperature 0, batches
are numbered prompt by prompt, and logprobs line up with the text."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Router, ask
from tests.unit.test_stops import reference

BOUNDED = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI does not flake on a new one
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,"]
# What the small model says often, so that stops do hit; and anything else.
STOP = st.one_of(
    st.sampled_from([" ", "e", "a", "\n", ",", " the", "Paris", "is a", " 4", "(", "  "]),
    st.text(alphabet=" etaoin,\n", min_size=1, max_size=3),
)


def _complete(router: Router, body: dict[str, Any]) -> dict[str, Any]:
    status, answer, _ = ask(router, body)
    assert status == 200, answer
    return answer


def _streamed(router: Router, body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {c["index"]: c for c in _complete(router, {**body, "stream": True})["choices"]}


@BOUNDED
@given(
    model=st.sampled_from(["local/smollm2-135m-instruct", "lm/full", "lm/no-stop", "upstream/smollm2"]),
    prompt=st.sampled_from(PROMPTS),
    stops=st.lists(STOP, min_size=1, max_size=4),
)
def test_stops_never_appear_and_streams_agree(
    router: Router, model: str, prompt: str, stops: list[str]
) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.0, "seed": 1}
    free = _complete(router, body)["choices"][0]
    stopped = _complete(router, {**body, "stop": stops})["choices"][0]
    streamed = _streamed(router, {**body, "stop": stops})[0]
    assert not any(stop in stopped["text"] for stop in stops)
    assert stopped["text"] == streamed["text"]
    assert stopped["finish_reason"] == streamed["finish_reason"]
    expected = reference(free["text"], stops)[0]
    if expected != free["text"]:  # a stop was in the free text: the answer ends where it began
        assert stopped["text"] == expected and stopped["finish_reason"] == "stop"
    else:  # no stop in reach (one could still complete across the max_tokens line: not here)
        assert stopped["text"] == free["text"]


@BOUNDED
@given(
    model=st.sampled_from(["local/smollm2-135m-instruct", "lm/full", "lm/no-n", "lm/no-prompt"]),
    prompts=st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=3),
    n=st.integers(1, 3),
    stream=st.booleans(),
)
def test_batches_are_numbered_prompt_by_prompt(
    router: Router, model: str, prompts: list[str], n: int, stream: bool
) -> None:
    body = {"model": model, "prompt": prompts, "n": n, "max_tokens": 3, "echo": True, "seed": 5}
    if stream:
        choices = _streamed(router, body)
        assert sorted(choices) == list(range(len(prompts) * n))
        texts = [choices[i]["text"] for i in range(len(prompts) * n)]
    else:
        answer = _complete(router, body)
        assert [c["index"] for c in answer["choices"]] == list(range(len(prompts) * n))
        texts = [c["text"] for c in answer["choices"]]
        single = [_complete(router, {**body, "prompt": p, "n": 1})["usage"] for p in prompts]
        assert answer["usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in single) * (
            1 if model != "lm/no-n" else n
        )
    for i, text in enumerate(texts):
        assert text.startswith(prompts[i // n])  # echo says which prompt a choice belongs to


@BOUNDED
@given(
    model=st.sampled_from(["local/smollm2-135m-instruct", "lm/full", "upstream/smollm2"]),
    prompt=st.sampled_from(PROMPTS),
    k=st.integers(0, 5),
    max_tokens=st.integers(1, 10),
    echo=st.booleans(),
    stream=st.booleans(),
)
def test_logprobs_line_up_with_tokens_and_text(
    router: Router, model: str, prompt: str, k: int, max_tokens: int, echo: bool, stream: bool
) -> None:
    if model == "upstream/smollm2":
        echo = False  # its echoed logprobs are shifted: declared, and refused (see docs)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "logprobs": k,
        "max_tokens": max_tokens,
        "echo": echo,
        "temperature": 0.0,
    }
    answer = _complete(router, {**body, "stream": stream})
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    tokens, offsets, text = lp["tokens"], lp["text_offset"], choice["text"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(tokens)
    assert all(len(top) <= k for top in lp["top_logprobs"] if top)
    if not stream:  # a stream's usage is asked for separately (include_usage)
        usage = answer["usage"]
        expected = usage["completion_tokens"] + (usage["prompt_tokens"] if echo else 0)
        assert len(tokens) == expected
    assert len(offsets) == len(tokens)
    for token, offset in zip(tokens, offsets, strict=True):
        assert text[offset:].startswith(token)
    assert "".join(tokens) == text


_LEAF = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 8)),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 100),
    ),
    st.just({"type": "boolean"}),
    st.lists(st.sampled_from(["red", "green", "blue", "cyan"]), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
    st.builds(
        lambda n: {"type": "array", "items": {"type": "boolean"}, "maxItems": n}, st.integers(0, 3)
    ),
)
SCHEMAS = st.dictionaries(
    st.sampled_from(["name", "count", "ok", "colour", "flags", "id"]), _LEAF, min_size=1, max_size=3
).map(
    lambda props: {
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": False,
    }
)


@BOUNDED
@given(schema=SCHEMAS, temperature=st.sampled_from([0.0, 1.0]), stream=st.booleans())
def test_every_json_schema_answer_of_the_local_engine_validates(
    router: Router, schema: dict[str, Any], temperature: float, stream: bool
) -> None:
    import jsonschema

    body = {
        "model": "local/smollm2-135m-instruct",
        "prompt": "A record as JSON:\n",
        "max_tokens": 120,
        "temperature": temperature,
        "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}},
    }
    choice = _streamed(router, body)[0] if stream else _complete(router, body)["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # bounded schemas end well inside 120 tokens
    jsonschema.validate(json.loads(choice["text"]), schema)
