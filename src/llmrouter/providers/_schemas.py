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
    kinds = node.get("type")
    is_object = kinds == "object" or (isinstance(kinds, list) and "object" in kinds)
    is_object = is_object or "properties" in node
    return is_object and node.get("additionalProperties") is not False


def _unknown(node: dict[str, Any], keywords: frozenset[str]) -> str | None:
    unknown = node.keys() - keywords
    return min(unknown) if unknown else None


# OpenAI's strict mode takes these keywords only, an object at the root, and every object closed
# with every property required. (Without `strict: true` a schema is taken as it is.)
_STRICT_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
     "$ref", "$defs", "definitions", "description", "title", "pattern", "format", "minimum",
     "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems"}
)  # fmt: skip


def openai_strict_problem(schema: dict[str, Any], strict: bool) -> str | None:
    if not strict:
        return None
    if schema.get("type") != "object":
        return "strict mode needs an object at the root"
    for node in subschemas(schema):
        if found := _unknown(node, _STRICT_KEYWORDS):
            return f"strict mode has no `{found}`"
        if _open_object(node):
            return "strict mode needs `additionalProperties: false` on every object"
        if "properties" in node and set(node.get("required", ())) != set(node["properties"]):
            return "strict mode needs every property required"
    return None


# Anthropic's structured outputs take these keywords only (its documented features), every object
# closed, `minItems` 0 or 1, string formats of its list, and no recursion.
_ANTHROPIC_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
     "allOf", "$ref", "$defs", "definitions", "description", "title", "default", "format",
     "minItems", "pattern"}
)  # fmt: skip
_ANTHROPIC_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"}
)


def anthropic_problem(schema: dict[str, Any], strict: bool) -> str | None:
    for node in subschemas(schema):
        if found := _unknown(node, _ANTHROPIC_KEYWORDS):
            return f"structured outputs have no `{found}`"
        if node.get("minItems", 0) not in (0, 1):
            return "structured outputs take `minItems` 0 or 1 only"
        if "format" in node and node["format"] not in _ANTHROPIC_FORMATS:
            return f"structured outputs have no format {node['format']!r}"
        if _open_object(node):
            return "structured outputs need `additionalProperties: false` on every object"
    if _recursive(schema):
        return "structured outputs take no recursive schema"
    return None


def _recursive(schema: dict[str, Any]) -> bool:
    """Whether the schema's `$ref`s make a cycle: to the root, or among its definitions."""
    if any(node.get("$ref") == "#" for node in subschemas(schema)):
        return True
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    refers: dict[str, set[str]] = {}
    for name, definition in defs.items():
        if isinstance(definition, dict):
            refers[name] = {
                ref.rsplit("/", 1)[-1]
                for node in subschemas(definition)
                if isinstance(ref := node.get("$ref"), str)
                and ref.startswith(("#/$defs/", "#/definitions/"))
            }
    done: set[str] = set()
    for start in refers:  # a walk from each definition: a cycle comes back to one on the path
        path, stack = set(), [(start, iter(sorted(refers[start])))]
        path.add(start)
        while stack:
            name, nexts = stack[-1]
            step = next(nexts, None)
            if step is None:
                stack.pop()
                path.discard(name)
                done.add(name)
            elif step in path:
                return True
            elif step in refers and step not in done:
                path.add(step)
                stack.append((step, iter(sorted(refers[step]))))
    return False


# Gemini's `responseJsonSchema`: these keywords only.
_GEMINI_KEYWORDS = frozenset(
    {"$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum", "items",
     "prefixItems", "minItems", "maxItems", "minimum", "maximum", "anyOf", "oneOf", "properties",
     "additionalProperties", "required", "propertyOrdering", "nullable"}
)  # fmt: skip


def gemini_problem(schema: dict[str, Any], strict: bool) -> str | None:
    for node in subschemas(schema):
        if found := _unknown(node, _GEMINI_KEYWORDS):
            return f"Gemini's schemas have no `{found}`"
    return None
