"""What each response_format demands of a text, and the schemas refused at the edge."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from llmrouter.errors import InvalidRequest
from llmrouter.structured import check_request_format, checker_for, gbnf_for
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
