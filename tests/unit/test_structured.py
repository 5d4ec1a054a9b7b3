"""What each response_format demands of a text, and the schemas refused at the edge."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
import pytest

from llmrouter.errors import InvalidRequest
from llmrouter.settings import CheckSettings
from llmrouter.structured import Checks, check_request_format, checker_for, gbnf_for, guidance_for
from llmrouter.wire.completions import CompletionCreateParams, ResponseFormat


def fmt(kind: str, **more: Any) -> ResponseFormat:
    params = msgspec.convert(
        {"prompt": "x", "response_format": {"type": kind, **more}}, CompletionCreateParams
    )
    assert params.response_format is not None
    return params.response_format


def schema_fmt(schema: dict[str, Any]) -> ResponseFormat:
    return fmt("json_schema", json_schema={"name": "s", "schema": schema})


def test_json_object() -> None:
    check = checker_for(fmt("json_object"))
    assert check is not None
    assert check('{"a": 1} ') is None
    assert "not an object" in (check("[1]") or "")
    assert "not JSON" in (check('{"a": ') or "")
    assert "not JSON" in (check("[" * 100_000 + "]" * 100_000) or "")  # too deep: invalid, no crash


def test_json_schema() -> None:
    check = checker_for(
        schema_fmt({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    )
    assert check is not None
    assert check('{"n": 3}') is None
    assert "is a required property" in (check("{}") or "")
    assert "not of type 'integer'" in (check('{"n": "x"}') or "")


def test_python() -> None:
    check = checker_for(fmt("python"))
    assert check is not None
    assert check("x = 1\nprint(x)") is None
    assert "not valid Python" in (check("def (") or "")
    assert "not valid Python" in (check("-" * 200_000 + "1") or "")  # too deep for the parser


def test_a_pattern_written_to_backtrack_for_ever_fails_in_bounded_time() -> None:
    check = checker_for(schema_fmt({"type": "string", "pattern": "^(a|aa)+$"}))
    assert check is not None
    started = time.perf_counter()
    assert check('"' + "a" * 60 + 'b"') is not None
    assert time.perf_counter() - started < 2
    assert check('"aaaa"') is None


@pytest.mark.parametrize(
    "ref",
    [
        "https://example.invalid/s.json",
        "http://169.254.169.254/latest",
        "other.json#/x",
        "#/$defs/missing",
    ],
)
def test_references_must_resolve_inside_the_schema(ref: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_request_format(schema_fmt({"$defs": {"here": {"type": "string"}}, "$ref": ref}))
    assert caught.value.param == "response_format.json_schema.schema"


def test_a_reference_inside_the_schema_is_followed() -> None:
    response_format = schema_fmt(
        {"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}
    )
    check_request_format(response_format)
    check = checker_for(response_format)
    assert check is not None
    assert check('{"a": 1}') is None
    assert check('{"a": "x"}') is not None


def test_bad_schemas_and_patterns_are_refused() -> None:
    for schema in ({"type": "bogus"}, {"pattern": "("}, {"minimum": "x"}):
        with pytest.raises(InvalidRequest):
            check_request_format(schema_fmt(schema))


def test_small_integer_ranges_reach_the_grammar_as_enums() -> None:
    grammar = gbnf_for(
        schema_fmt(
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 5}}}
        )
    )
    assert all(f'"{n}"' in grammar for n in (3, 4, 5))
    assert '"6"' not in grammar


# -- hostile input: the time one answer's check may take, and nesting at the edge ---------------

# Issue 11: 150 strings against a pattern that backtracks, each up to the old per-string limit.
BACKTRACKING = {"type": "array", "items": {"type": "string", "pattern": "(a{1,10}){1,10}b"}}
BACKTRACKING_ANSWER = json.dumps(["a" * 23] * 150)
# Each string matches, after ~30 ms of backtracking: within any per-string limit, never an error.
SLOW = {"type": "array", "items": {"type": "string", "pattern": "(a{1,10}){1,10}b|^a+$"}}
SLOW_ANSWER = json.dumps(["a" * 20] * 150)


def test_one_answers_check_has_one_time_budget_for_all_its_patterns() -> None:
    check = checker_for(schema_fmt(SLOW))  # checks.answer_seconds: 1 by default
    assert check is not None
    started = time.perf_counter()
    problem = check(SLOW_ANSWER)
    elapsed = time.perf_counter() - started
    assert problem is not None and "ran out of time" in problem and "answer_seconds: 1 s" in problem
    assert elapsed < 1.5  # the budget (and a little), not 150 x 30 ms
    assert check(json.dumps(["a" * 20] * 3)) is None  # a few of them are checked in time


def test_the_budget_is_the_configured_one() -> None:
    check = checker_for(schema_fmt(BACKTRACKING), CheckSettings(answer_seconds=0.05))
    assert check is not None
    started = time.perf_counter()
    assert "ran out of time" in (check(BACKTRACKING_ANSWER) or "")  # one string takes ~0.4 s
    assert time.perf_counter() - started < 0.5


def test_the_check_stops_at_the_first_error() -> None:
    check = checker_for(schema_fmt(BACKTRACKING))
    assert check is not None
    started = time.perf_counter()
    problem = check(json.dumps([1, *["a" * 23] * 150]))
    assert problem is not None and problem.startswith("at 0:") and "not of type 'string'" in problem
    assert time.perf_counter() - started < 0.5  # none of the 150 strings after it was tried


def test_a_schema_that_visits_an_answer_exponentially_often_runs_out_of_time() -> None:
    """40 definitions, each `allOf` the next twice: 2^40 visits of one string, no pattern at all."""
    defs: dict[str, Any] = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(40)}
    defs["d40"] = {"type": "string"}
    check = checker_for(
        schema_fmt({"$defs": defs, "$ref": "#/$defs/d0"}), CheckSettings(answer_seconds=0.2)
    )
    assert check is not None
    started = time.perf_counter()
    assert "ran out of time" in (check('"x"') or "")
    assert time.perf_counter() - started < 1


def test_a_long_check_leaves_the_event_loop_free() -> None:
    """The router's way (`Checks`): the check runs in the pool; the loop ticks on meanwhile."""
    checks = Checks(CheckSettings())

    async def check_while_ticking() -> tuple[str | None, list[float]]:
        checker = await checks.admit(schema_fmt(SLOW))
        assert checker is not None
        gaps: list[float] = []

        async def tick() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                gaps.append(time.perf_counter() - last)
                last += gaps[-1]

        ticker = asyncio.ensure_future(tick())
        try:
            return await checker.check(SLOW_ANSWER), gaps
        finally:
            ticker.cancel()

    try:
        problem, gaps = asyncio.run(check_while_ticking())
    finally:
        checks.close()
    assert problem is not None and "ran out of time" in problem
    assert len(gaps) > 20 and max(gaps) < 0.1  # (issue 11's bound for /health)


def test_the_router_s_checks_refuse_what_the_edge_refuses() -> None:
    checks = Checks(CheckSettings(schema_depth=8, grammar_depth=4))
    try:
        for response_format, param in [
            (schema_fmt(nested("not", 8)), "response_format.json_schema.schema"),
            (schema_fmt(nested("items", 3000)), "response_format.json_schema.schema"),
            (fmt("grammar", grammar="root ::= " + "(" * 5 + '"a"' + ")" * 5), "response_format.grammar"),
        ]:
            with pytest.raises(InvalidRequest) as caught:
                asyncio.run(checks.admit(response_format))
            assert caught.value.param == param
        assert asyncio.run(checks.admit(schema_fmt(nested("not", 7)))) is not None
        assert asyncio.run(checks.admit(fmt("grammar", grammar='root ::= (((("a"))))'))) is None
    finally:
        checks.close()


def nested(key: str, depth: int) -> Any:
    """`depth` levels of `{key: ...}` around `{}`; of `{key: [...]}` for a key such as "anyOf[]",
    of `[...]` for the key "[]"."""
    node: Any = {}
    for _ in range(depth):
        if key == "[]":
            node = [node]
        elif key.endswith("[]"):
            node = {key[:-2]: [node]}
        else:
            node = {key: node}
    return node


@pytest.mark.parametrize(
    "schema",
    [
        nested("not", 122),
        nested("items", 400),
        nested("anyOf[]", 70),
        {"properties": nested("a", 900)},
        {"enum": [nested("[]", 900)]},
        {"$defs": nested("x", 500)},
    ],
    ids=["not-122", "items-400", "anyOf-70", "properties-900", "enum-900", "defs-500"],
)
def test_a_schema_nested_too_deeply_is_a_400_with_the_limit(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_request_format(schema_fmt(schema))
    assert caught.value.param == "response_format.json_schema.schema"
    assert "64 levels" in caught.value.message and "checks.schema_depth" in caught.value.message


def test_a_schema_at_the_depth_limit_is_taken() -> None:
    check_request_format(schema_fmt(nested("not", 63)))  # 64 objects, the innermost empty
    check_request_format(schema_fmt({"type": "string", "pattern": "(" * 64 + "a" + ")" * 64}))


@pytest.mark.parametrize("groups", [65, 490, 5000])
def test_a_pattern_nested_too_deeply_is_a_400_with_the_limit(groups: int) -> None:
    pattern = "(" * groups + "a" + ")" * groups
    with pytest.raises(InvalidRequest) as caught:
        check_request_format(schema_fmt({"type": "string", "pattern": pattern}))
    assert caught.value.param == "response_format.json_schema.schema"
    assert "64" in caught.value.message and "checks.schema_depth" in caught.value.message


def test_a_grammar_nested_too_deeply_is_a_400_with_the_limit() -> None:
    grammar = "root ::= " + "(" * 490 + '"a"' + ")" * 490
    with pytest.raises(InvalidRequest) as caught:
        check_request_format(fmt("grammar", grammar=grammar))
    assert caught.value.param == "response_format.grammar"
    assert "64" in caught.value.message and "checks.grammar_depth" in caught.value.message
    assert "line 1, column 74 (character 73)" in caught.value.message  # the 65th group


def test_a_grammar_larger_than_the_limit_is_a_400() -> None:
    rule = 'r ::= "' + "x" * 70 + '"\n'
    grammar = "root ::= r\n" + rule * (3_400_000 // len(rule))  # 3.4 MB, as in issue 11
    with pytest.raises(InvalidRequest) as caught:
        check_request_format(fmt("grammar", grammar=grammar))
    assert caught.value.param == "response_format.grammar"
    assert "262144 bytes" in caught.value.message and "checks.grammar_bytes" in caught.value.message


def test_a_small_grammar_that_expands_to_too_many_rules_is_a_400() -> None:
    grammar = "root ::= " + '"a"{0,2000} ' * 100  # 1.2 kB; llama.cpp would make 200,000 rules
    with pytest.raises(InvalidRequest) as caught:
        check_request_format(fmt("grammar", grammar=grammar))
    assert caught.value.param == "response_format.grammar"
    assert "100000 rules" in caught.value.message and "checks.grammar_rules" in caught.value.message


def test_a_schema_whose_grammar_would_be_too_large_is_a_400() -> None:
    pytest.importorskip("llama_cpp")
    strings = {f"p{i}": {"type": "string", "maxLength": 1900} for i in range(60)}
    with pytest.raises(InvalidRequest) as caught:
        gbnf_for(schema_fmt({"type": "object", "properties": strings}))
    assert caught.value.param == "response_format.json_schema.schema"
    assert "cannot be turned into a grammar" in caught.value.message
    assert "checks.grammar_bytes" in caught.value.message  # 920 kB of GBNF from a 3 kB schema


def test_a_schema_llguidance_cannot_read_falls_back_to_the_gbnf_grammar() -> None:
    pytest.importorskip("llguidance")
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(64):  # 129 levels of JSON: deeper than llguidance's JSON parser goes
        schema = {"type": "object", "properties": {"a": schema}}
    assert guidance_for(schema_fmt(schema)) is None  # (the schema_depth maximum is 100)
