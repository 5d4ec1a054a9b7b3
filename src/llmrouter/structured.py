"""Structured output: what each `response_format` demands of the text, checked by the router.

Every deployment's answer is checked here, whether the deployment constrained its decoding or not:
a choice that ended by itself (`finish_reason: stop`) must satisfy the format, or the attempt fails
with `InvalidOutput` and the executor asks again (then the next model). A choice cut short by
`max_tokens` is returned as it is, as OpenAI does: the client's own limit cut it.
"""

from __future__ import annotations

import ast
import json
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jsonschema
import msgspec
import referencing.exceptions

from llmrouter.errors import InvalidRequest
from llmrouter.providers import _grammar
from llmrouter.providers._grammar import check_grammar
from llmrouter.wire.completions import (
    ResponseFormat,
    ResponseFormatGrammar,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatPython,
)

__all__ = ["Checker", "check_request_format", "checker_for", "format_kind", "gbnf_for"]

# A checker says what is wrong with a text, or None when it satisfies the format.
Checker = Callable[[str], str | None]


def format_kind(response_format: ResponseFormat | None) -> str:
    """The format's `type`: "text" when there is none."""
    if response_format is None:
        return "text"
    return str(response_format.__struct_config__.tag)


def check_request_format(response_format: ResponseFormat | None) -> None:
    """At the edge: a schema that is not a valid JSON Schema, or a grammar that does not parse, is
    the client's error (400), whichever deployment would have answered."""
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        if schema is msgspec.UNSET:
            return
        _validator(_freeze(schema))  # raises InvalidRequest
    elif isinstance(response_format, ResponseFormatGrammar):
        check_grammar(response_format.grammar)


def gbnf_for(response_format: ResponseFormat | None) -> str:
    """A constrained format as a GBNF grammar, for engines that decode under one (llama.cpp)."""
    if isinstance(response_format, ResponseFormatJSONObject):
        return _grammar.json_object_grammar()
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        return _schema_grammar("{}" if schema is msgspec.UNSET else _freeze(schema))
    if isinstance(response_format, ResponseFormatGrammar):
        return response_format.grammar
    raise ValueError(f"no grammar for response_format {format_kind(response_format)!r}")


@lru_cache(maxsize=256)
def _schema_grammar(frozen: str) -> str:
    return _grammar.json_schema_grammar(json.loads(frozen))


def checker_for(response_format: ResponseFormat | None) -> Checker | None:
    """The check for a format; None for free text and for grammars (which only a deployment that
    decodes under the grammar honours, so there is nothing to check afterwards)."""
    if isinstance(response_format, ResponseFormatJSONObject):
        return _json_object
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        if schema is msgspec.UNSET:
            return _json_any
        validator = _validator(_freeze(schema))
        return lambda text: _json_schema(validator, text)
    if isinstance(response_format, ResponseFormatPython):
        return _python
    return None


def _json_object(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _json_any(text: str) -> str | None:
    try:
        json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    return None


def _json_schema(validator: Any, text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except referencing.exceptions.Unresolvable as exc:  # never fetched: no network from schemas
        raise InvalidRequest(
            f"`response_format.json_schema.schema` has a reference that cannot be resolved: {exc}",
            param="response_format.json_schema.schema",
        ) from None
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the document"
    return f"at {where}: {error.message}"[:500]


def _python(text: str) -> str | None:
    try:
        with warnings.catch_warnings():  # invalid escapes etc. warn; only syntax matters here
            warnings.simplefilter("ignore")
            ast.parse(text)
    except (SyntaxError, ValueError) as exc:
        return f"not valid Python: {exc}"
    return None


def _freeze(schema: dict[str, Any]) -> str:
    """A hashable form of a schema, so compiled validators are shared between requests."""
    return json.dumps(schema, sort_keys=True)


@lru_cache(maxsize=256)
def _validator(frozen: str) -> Any:
    schema = json.loads(frozen)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidRequest(
            f"`response_format.json_schema.schema` is not a valid JSON Schema"
            f"{f' (at {where})' if where else ''}: {exc.message}"[:600],
            param="response_format.json_schema.schema",
        ) from None
    return cls(schema)
