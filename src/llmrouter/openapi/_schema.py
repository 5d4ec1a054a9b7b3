"""Pieces the document is built of: the shared spec, response objects, the bounds the wire types
enforce, and the translation of the shared spec's OpenAPI 3.0 schemas into the served 3.2."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import msgspec

__all__ = [
    "RATE_LIMIT_HEADERS",
    "REQUEST_ID_HEADER",
    "RETRY_AFTER_HEADER",
    "as_openapi_3_2",
    "constrain",
    "error",
    "json_response",
    "ref",
    "shared_spec",
    "wire_bounds",
]

Schema = dict[str, Any]

# The keywords of msgspec's JSON Schema that say what a value may be, beyond its type.
_BOUNDS = frozenset({"minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern"})

REQUEST_ID_HEADER: Schema = {
    "X-Request-Id": {
        "schema": {"type": "string"},
        "description": "The request's id (a completion's id); the log line and the ledger have it.",
    }
}

RATE_LIMIT_HEADERS: Schema = {
    "X-RateLimit-Limit": {
        "schema": {"type": "integer"},
        "description": "The requests-per-minute limit (else tokens per minute) of the caller.",
    },
    "X-RateLimit-Remaining": {
        "schema": {"type": "integer"},
        "description": "What is left of it in the sliding minute.",
    },
    "X-RateLimit-Reset": {
        "schema": {"type": "integer"},
        "description": "Seconds until the window frees capacity.",
    },
}

RETRY_AFTER_HEADER: Schema = {
    "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}
}


def shared_spec() -> Schema:
    text = resources.files("llmrouter.spec").joinpath("completions.openapi.json").read_text()
    spec: Schema = json.loads(text)
    return spec


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def error(description: str, headers: Schema | None = None) -> Schema:
    """A response in the spec's error shape, with the headers every error carries."""
    return {
        "description": description,
        "headers": {**REQUEST_ID_HEADER, **(headers or {})},
        "content": {"application/json": {"schema": ref("ErrorResponse")}},
    }


def json_response(description: str, schema: Schema, headers: Schema | None = None) -> Schema:
    return {
        "description": description,
        "headers": {**REQUEST_ID_HEADER, **(headers or {})},
        "content": {"application/json": {"schema": schema}},
    }


def wire_bounds(struct: type[msgspec.Struct]) -> dict[str, dict[str, Schema]]:
    """The ranges, lengths and counts msgspec enforces on each field of `struct`, by the JSON type
    they apply to (`{"temperature": {"number": {"minimum": 0.0, "maximum": 2.0}}}`), read off
    msgspec's own schema of the type: the document then states what decoding refuses, and a
    change of a bound in the wire types changes the document with it."""
    (_,), components = msgspec.json.schema_components([struct])
    bounds: dict[str, dict[str, Schema]] = {}
    for name, field in components[struct.__name__]["properties"].items():
        for branch in field.get("anyOf", [field]):
            kept = {k: v for k, v in branch.items() if k in _BOUNDS}
            if kept:
                bounds.setdefault(name, {})[branch["type"]] = kept
    return bounds


def constrain(schema: Schema, struct: type[msgspec.Struct]) -> None:
    """Give each property of an object `schema` the bounds `struct` enforces on its field, where
    the property has one type (fields that are unions are constrained branch by branch, by hand)."""
    for name, by_type in wire_bounds(struct).items():
        prop = schema["properties"][name]
        if prop.get("type") in by_type:
            prop.update(by_type[prop["type"]])


def as_openapi_3_2(spec: Schema) -> Schema:
    """The document as OpenAPI 3.2, whose schemas are JSON Schema 2020-12: 3.0's `nullable`
    becomes a "null" type (an enum's null value, a union's null branch). 3.2 is what describes
    each event of a stream (`itemSchema`), and 2020-12 what can constrain a map's keys."""
    translated: Schema = _without_nullable(spec)
    translated["openapi"] = "3.2.0"
    return translated


def _without_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _without_nullable(v) for k, v in node.items()}
    nullable = out.get("nullable")
    if not isinstance(nullable, bool):  # a property named "nullable" holds a schema, not a flag
        return out
    del out["nullable"]
    if not nullable:
        return out
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    elif "oneOf" in out or "anyOf" in out:
        union = "oneOf" if "oneOf" in out else "anyOf"
        out[union] = [*out[union], {"type": "null"}]
    elif "$ref" in out:
        out["anyOf"] = [{"$ref": out.pop("$ref")}, {"type": "null"}]
    return out
