"""The served OpenAPI document, in process: it is valid OpenAPI 3.2, and its request schemas accept
exactly what the router's decoding accepts (issue 4: the ranges the router enforced were absent)."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from llmrouter.accounts.keys import KeyError_, check_label
from llmrouter.errors import InvalidRequest
from llmrouter.openapi import build_openapi
from llmrouter.openapi._accounts import label_pattern
from llmrouter.wire.validate import decode_completion_request


@cache
def document() -> dict[str, Any]:
    return build_openapi()


def schema_check(name: str, body: Any) -> bool:
    root = {"$ref": f"#/components/schemas/{name}", "components": document()["components"]}
    return bool(jsonschema.Draft202012Validator(root).is_valid(body))


def router_accepts(body: dict[str, Any]) -> bool:
    try:
        decode_completion_request(json.dumps(body).encode())
    except InvalidRequest:
        return False
    return True


def test_the_document_is_valid_openapi_3_2() -> None:
    assert document()["openapi"] == "3.2.0"
    validate_openapi(document())


OK = {"prompt": "Hi"}


@pytest.mark.parametrize(
    "body",
    [
        OK,
        {**OK, "temperature": 2, "top_p": 1, "n": 128, "best_of": 128, "max_tokens": 0},
        {**OK, "frequency_penalty": -2, "presence_penalty": 2.0, "logprobs": 0, "seed": -(2**70)},
        {**OK, "logit_bias": {"0": -100, "50256": 100.0}, "stop": ["a", "b", "c", "d"]},
        {**OK, "metadata": {f"k{i}": "v" * 512 for i in range(16)}, "user": "u" * 256},
        {**OK, "stream": True, "stream_options": {"include_usage": True}},
        {**OK, "stream_options": None, "model": "m" * 256, "models": ["a"]},
        {"prompt": ["a", ""]},
        {"prompt": [0, 1]},
        {"prompt": [[0], [1, 2]]},
        {**OK, "n": 2.0, "max_tokens": 1e2},  # whole numbers are integers (JSON Schema 2020-12)
        {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "a-Z_9"}}},
        {**OK, "provider": {"order": None, "only": ["p"], "sort": None}},
    ],
)
def test_what_the_document_accepts_the_router_accepts(body: dict[str, Any]) -> None:
    assert schema_check("CompletionCreateParams", body)
    assert router_accepts(body)


@pytest.mark.parametrize(
    "body",
    [
        {**OK, "temperature": 2.01},
        {**OK, "temperature": -0.1},
        {**OK, "top_p": 1.5},
        {**OK, "n": 0},
        {**OK, "n": 129},
        {**OK, "n": 1.5},
        {**OK, "best_of": 0},
        {**OK, "frequency_penalty": 2.5},
        {**OK, "presence_penalty": -2.5},
        {**OK, "logit_bias": {"1": 101}},
        {**OK, "logit_bias": {"1": True}},
        {**OK, "logit_bias": {"token": 1}},
        {**OK, "logit_bias": {"12345678901": 1}},
        {**OK, "stop": ["a", "b", "c", "d", "e"]},
        {**OK, "stop": ""},
        {**OK, "stop": ["a", ""]},
        {**OK, "max_tokens": -1},
        {**OK, "logprobs": -1},
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [-1]},
        {"prompt": [1.5]},
        {"prompt": ["a", 1]},
        {**OK, "metadata": {f"k{i}": "v" for i in range(17)}},
        {**OK, "metadata": {"k" * 65: "v"}},
        {**OK, "metadata": {"k": "v" * 513}},
        {**OK, "metadata": {"k": 1}},
        {**OK, "stream_options": {"include_usage": True}},
        {**OK, "stream": False, "stream_options": {}},
        {**OK, "model": ""},
        {**OK, "models": [""]},
        {**OK, "model": "m" * 257},
        {**OK, "user": "u" * 257},
        {**OK, "colour": "red"},
        {**OK, "stream_options": {"colour": "red"}},
        {**OK, "provider": {"colour": "red"}},
        {**OK, "response_format": {"type": "text", "colour": "red"}},
        {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        {**OK, "response_format": {"type": "grammar", "grammar": ""}},
        {**OK, "stream": None},
    ],
)
def test_what_the_router_refuses_the_document_refuses(body: dict[str, Any]) -> None:
    assert not router_accepts(body)
    assert not schema_check("CompletionCreateParams", body)


def test_a_key_name_pattern_is_check_label() -> None:
    """The pattern refuses exactly the names check_label refuses for their characters: NUL, and
    Python's whitespace alone (another set than a schema's `\\s`), for every code point."""
    pattern = re.compile(label_pattern())
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:  # a surrogate cannot be encoded, which check_label refuses
            continue
        name = chr(code)
        try:
            check_label("name", name)
            accepted = True
        except KeyError_:
            accepted = False
        assert (pattern.fullmatch(name) is not None) == accepted, hex(code)
    assert pattern.fullmatch(" a\t") and not pattern.fullmatch("a\x00b")


def test_the_stream_is_described_event_by_event() -> None:
    ok = document()["paths"]["/completions"]["post"]["responses"]["200"]
    events = ok["content"]["text/event-stream"]["itemSchema"]
    data = events["properties"]["data"]
    assert data["if"] == {"const": "[DONE]"}
    assert data["else"]["contentMediaType"] == "application/json"
    chunk = document()["components"]["schemas"]["CompletionChunk"]
    assert {"id", "choices", "created", "model", "provider"} <= set(chunk["required"])


def test_every_405_is_documented_with_allow() -> None:
    allow = document()["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]
    assert allow["required"] is True
