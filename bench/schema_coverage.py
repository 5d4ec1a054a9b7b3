"""Which JSON Schema keywords each grammar compiler constrains: llama-cpp-python's converter (what
the local engine uses) against llguidance, if installed.

    .venv/bin/python bench/schema_coverage.py          # llama-cpp-python's converter alone
    .venv/bin/pip install llguidance==1.9.1 && .venv/bin/python bench/schema_coverage.py

For llama-cpp-python a keyword counts as constrained when adding it changes the grammar (a converter
that ignores a keyword produces the same grammar with and without it); for llguidance, when its
compiler accepts the schema without an error or warning. Prints a markdown table.
"""

from __future__ import annotations

import json
from typing import Any

STRING = {"type": "string"}
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (keyword, schema without it, schema with it)
    ("string minLength/maxLength", STRING, {"type": "string", "minLength": 2, "maxLength": 5}),
    ("string pattern", STRING, {"type": "string", "pattern": "^[a-z]+[0-9]$"}),
    ("string format: date", STRING, {"type": "string", "format": "date"}),
    ("string format: email", STRING, {"type": "string", "format": "email"}),
    ("string format: uuid", STRING, {"type": "string", "format": "uuid"}),
    ("integer minimum/maximum", {"type": "integer"}, {"type": "integer", "minimum": 3, "maximum": 70}),
    ("integer exclusiveMinimum", {"type": "integer"}, {"type": "integer", "exclusiveMinimum": 5}),
    ("number minimum", {"type": "number"}, {"type": "number", "minimum": 1.5}),
    ("multipleOf", {"type": "integer"}, {"type": "integer", "multipleOf": 5}),
    (
        "array minItems/maxItems",
        {"type": "array", "items": STRING},
        {"type": "array", "items": STRING, "minItems": 1, "maxItems": 2},
    ),
    (
        "array uniqueItems",
        {"type": "array", "items": STRING},
        {"type": "array", "items": STRING, "uniqueItems": True},
    ),
    (
        "prefixItems",
        {"type": "array"},
        {"type": "array", "prefixItems": [STRING, {"type": "integer"}], "items": False},
    ),
    ("enum", STRING, {"enum": ["a", "b"]}),
    ("const", STRING, {"const": "a"}),
    ("anyOf", STRING, {"anyOf": [STRING, {"type": "integer"}]}),
    ("oneOf", STRING, {"oneOf": [STRING, {"type": "integer"}]}),
    (
        "allOf",
        {"type": "object"},
        {"allOf": [{"type": "object", "properties": {"a": STRING}, "required": ["a"]}]},
    ),
    ("not", STRING, {"type": "string", "not": {"const": "x"}}),
    (
        "$ref to $defs",
        {"type": "object"},
        {
            "$defs": {"s": STRING},
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/s"}},
            "required": ["a"],
        },
    ),
    (
        "additionalProperties: false",
        {"type": "object", "properties": {"a": STRING}, "additionalProperties": True},
        {"type": "object", "properties": {"a": STRING}, "additionalProperties": False},
    ),
    (
        "additionalProperties: schema",
        {"type": "object"},
        {"type": "object", "additionalProperties": {"type": "integer"}},
    ),
    (
        "patternProperties",
        {"type": "object"},
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    ),
    ("minProperties", {"type": "object"}, {"type": "object", "minProperties": 1}),
    (
        "if/then/else",
        {"type": "object"},
        {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
    ),
]


def llama_cpp_python(without: dict[str, Any], with_: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        plain = json_schema_to_gbnf(json.dumps(without))
        constrained = json_schema_to_gbnf(json.dumps(with_))
    except Exception as exc:
        return f"error: {type(exc).__name__}: {str(exc)[:60]}"
    return "constrained" if plain != constrained else "**ignored**"


def llguidance_verdict(schema: dict[str, Any]) -> str:
    try:
        import llguidance
    except ImportError:
        return "(not installed)"
    grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        return f"error: {' '.join(messages)[:70]}"
    return f"warning: {' '.join(messages)[:70]}" if messages else "constrained"


def main() -> None:
    print("| keyword | llama-cpp-python converter | llguidance |")
    print("|---|---|---|")
    for name, without, with_ in CASES:
        print(f"| {name} | {llama_cpp_python(without, with_)} | {llguidance_verdict(with_)} |")


if __name__ == "__main__":
    main()
