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
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import msgspec
import regex

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

__all__ = ["Checker", "check_request_format", "checker_for", "format_kind", "gbnf_for", "guidance_for"]

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


def guidance_for(response_format: ResponseFormat | None) -> str | None:
    """A JSON Schema as an llguidance grammar, when llguidance is installed and implements every
    keyword the schema uses (else None: llama.cpp's grammar, and the check, do the work)."""
    if not isinstance(response_format, ResponseFormatJSONSchema):
        return None
    schema = response_format.json_schema.schema
    return _guidance_grammar("{}" if schema is msgspec.UNSET else _freeze(schema))


@lru_cache(maxsize=256)
def _guidance_grammar(frozen: str) -> str | None:
    try:
        from llguidance import LLMatcher
    except ImportError:
        return None
    # Separators as json.dumps writes them, and no other whitespace: a small model left free to
    # indent can indent for ever.
    grammar = LLMatcher.grammar_from_json_schema(
        frozen,
        overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    )
    is_error, _ = LLMatcher.validate_grammar_with_warnings(grammar)
    return None if is_error else str(grammar)


@lru_cache(maxsize=256)
def _schema_grammar(frozen: str) -> str:
    return _grammar.json_schema_grammar(_bounded_integers(json.loads(frozen)))


_ENUMERABLE = 1024


def _bounded_integers(node: Any) -> Any:
    """llama-cpp-python's converter ignores an integer's minimum and maximum; a range small enough
    is written out as an enum, which it does constrain. (Larger ranges are checked afterwards.)"""
    if isinstance(node, list):
        return [_bounded_integers(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_integers(v) for k, v in node.items()}
    low, high = out.get("minimum"), out.get("maximum")
    if (
        out.get("type") == "integer"
        and isinstance(low, int)
        and isinstance(high, int)
        and 0 <= high - low < _ENUMERABLE
        and not {"enum", "const", "multipleOf", "exclusiveMinimum", "exclusiveMaximum"} & out.keys()
    ):
        return {"enum": list(range(low, high + 1))}
    return out


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
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _json_any(text: str) -> str | None:
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    return None


def _json_schema(validator: Any, text: str) -> str | None:
    import jsonschema
    import referencing.exceptions

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except RecursionError:
        return "nested too deeply to check"
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
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return f"not valid Python: {type(exc).__name__}: {exc}"
    return None


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object in a schema, the schema itself first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from _objects(item)


def _check_inside(schema: dict[str, Any]) -> None:
    """Every `$ref` resolves inside the schema (a reference elsewhere would be a request from the
    router to wherever the client likes: the registry is empty and retrieves nothing), and every
    pattern is a regular expression."""
    import referencing
    import referencing.exceptions
    import referencing.jsonschema

    root = referencing.Resource.from_contents(schema, referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().resolver_with_root(root)
    for node in _objects(schema):
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                raise InvalidRequest(
                    f"`$ref` {ref[:100]!r} does not point inside the schema; llmrouter resolves "
                    "references only within the schema itself (`#/$defs/...`).",
                    param="response_format.json_schema.schema",
                ) from None
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise InvalidRequest(
                    "`response_format.json_schema.schema` has a pattern that is not a regular "
                    f"expression: {exc}",
                    param="response_format.json_schema.schema",
                ) from None


def _freeze(schema: dict[str, Any]) -> str:
    """A hashable form of a schema, so compiled validators are shared between requests."""
    return json.dumps(schema, sort_keys=True)


@lru_cache(maxsize=256)
def _validator(frozen: str) -> Any:
    import jsonschema  # imported on first use: it is most of a start-up otherwise
    import referencing

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
    _check_inside(schema)
    # Patterns are the client's, run on the model's text: with a time limit, so that one written to
    # backtrack for ever costs a failed check, not the server.
    bounded = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        cls, {"pattern": _pattern, "patternProperties": _pattern_properties}
    )
    # An empty registry: a reference is resolved inside the schema or not at all, never fetched.
    return bounded(schema, registry=referencing.Registry())


_PATTERN_SECONDS = 0.1


def _search(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=_PATTERN_SECONDS) is not None
    except TimeoutError:
        return False  # treated as no match: the answer fails the check


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance[:80]!r} does not match {pattern[:80]!r}")


def _pattern_properties(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)
