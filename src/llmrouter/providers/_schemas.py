"""The subsets of JSON Schema each provider constrains its decoding to, as predicates for
`Capabilities.schema_support`: (schema, strict) -> None when the provider takes the schema as it
is, else why not. A schema a provider would not take is not sent to it: llmrouter checks the
answers instead (and asks again), so an upstream never answers a 400 for a keyword it lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["anthropic_problem", "gemini_problem", "openai_strict_problem", "subschemas"]

_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every schema inside a JSON Schema, itself first (a property named `not` is a name, not
    the keyword)."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend(node[key])
        for key in _SUBSCHEMAS:
            value = node.get(key)
            stack.extend(value if isinstance(value, list) else [value])


def _open_object(node: dict[str, Any]) -> bool:
    is_object = node.get("type") == "object" or "properties" in node
    return is_object and node.get("additionalProperties") is not False


# OpenAI's strict mode: an object at the root, every object closed with every property required,
# and none of these keywords. (Without `strict: true` a schema is taken as it is.)
_NOT_IN_STRICT = frozenset(
    {"oneOf", "allOf", "not", "if", "then", "else", "patternProperties", "unevaluatedProperties",
     "propertyNames", "minProperties", "maxProperties", "unevaluatedItems", "contains",
     "minContains", "maxContains", "uniqueItems", "dependentRequired", "dependentSchemas"}
)  # fmt: skip


def openai_strict_problem(schema: dict[str, Any], strict: bool) -> str | None:
    if not strict:
        return None
    if schema.get("type") != "object":
        return "strict mode needs an object at the root"
    for node in subschemas(schema):
        if found := _NOT_IN_STRICT & node.keys():
            return f"strict mode has no `{min(found)}`"
        if _open_object(node):
            return "strict mode needs `additionalProperties: false` on every object"
        if "properties" in node and set(node.get("required", ())) != set(node["properties"]):
            return "strict mode needs every property required"
    return None


# Anthropic's structured outputs: every object closed, `minItems` 0 or 1 only, no recursion, and
# none of these keywords.
_NOT_IN_ANTHROPIC = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
     "maxLength", "maxItems", "uniqueItems", "minProperties", "maxProperties", "not",
     "patternProperties", "if", "then", "else"}
)  # fmt: skip


def anthropic_problem(schema: dict[str, Any], strict: bool) -> str | None:
    for node in subschemas(schema):
        if found := _NOT_IN_ANTHROPIC & node.keys():
            return f"structured outputs have no `{min(found)}`"
        if node.get("minItems", 0) not in (0, 1):
            return "structured outputs take `minItems` 0 or 1 only"
        if _open_object(node):
            return "structured outputs need `additionalProperties: false` on every object"
    if _recursive(schema):
        return "structured outputs take no recursive schema"
    return None


def _recursive(schema: dict[str, Any]) -> bool:
    """Whether a `$ref` points at the root, or at a definition from inside it."""
    if any(node.get("$ref") == "#" for node in subschemas(schema)):
        return True
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    for name, definition in defs.items():
        targets = (f"#/$defs/{name}", f"#/definitions/{name}")
        if isinstance(definition, dict) and any(
            node.get("$ref") in targets for node in subschemas(definition)
        ):
            return True
    return False


# Gemini's `responseJsonSchema`: these keywords only.
_GEMINI_KEYWORDS = frozenset(
    {"$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum", "items",
     "prefixItems", "minItems", "maxItems", "minimum", "maximum", "anyOf", "oneOf", "properties",
     "additionalProperties", "required", "propertyOrdering", "nullable"}
)  # fmt: skip


def gemini_problem(schema: dict[str, Any], strict: bool) -> str | None:
    for node in subschemas(schema):
        if unknown := node.keys() - _GEMINI_KEYWORDS:
            return f"Gemini's schemas have no `{min(unknown)}`"
    return None
