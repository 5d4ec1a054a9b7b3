"""Validate bodies against the shared spec's schemas (OpenAPI 3.0 `nullable` turned into JSON
Schema) or the served document's (OpenAPI 3.2: JSON Schema 2020-12 already), so a response that
drifts from the contract fails a test."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from llmrouter.openapi import build_openapi

SHARED = Path(__file__).resolve().parents[2] / "shared" / "spec" / "completions.openapi.json"


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in ("nullable", "format")}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _root(served: bool) -> dict[str, Any]:
    from llmrouter.openapi import shared_spec

    if served:
        return {"components": {"schemas": build_openapi()["components"]["schemas"]}}
    return {"components": {"schemas": _convert(shared_spec()["components"]["schemas"])}}


def validate(body: Any, schema: str, *, served: bool = False) -> None:
    """Raise if `body` does not match components/schemas/`schema` of the shared (or served) spec."""
    root = _root(served)
    validator = jsonschema.Draft202012Validator if served else jsonschema.Draft7Validator
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{schema}", **root}, cls=validator)


def assert_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is `status` with the spec's error body (and `param` when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = json.loads(response.text)
    validate(body, "ErrorResponse")
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body
    return body  # type: ignore[no-any-return]
