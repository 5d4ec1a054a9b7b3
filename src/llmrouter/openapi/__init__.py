"""The OpenAPI document this server serves: the shared spec, corrected, made exact and extended.

The shared spec (`spec/completions.openapi.json`, OpenAPI 3.0.3) is the contract and stays as it
is. The served document is OpenAPI 3.2, whose schemas are JSON Schema 2020-12, because 3.0 cannot
say what the router enforces: each event of a stream (`itemSchema`), which keys a map may have
(`logit_bias`: token ids), a rule between two fields (`stream_options` only with `stream`).

- Corrections: `tags` was a nested array; the first echoed token's logprob and top_logprobs are
  null, as OpenAI sends them; token ids are integers.
- Exactness: every range, length and count the router refuses with a 400 is in the schemas, read
  where it can be off the wire types that enforce it; every object refuses unknown fields. What a
  schema cannot state (`best_of` >= `n`; a grammar or schema the router can check; names of this
  router's providers and models; a deployment able to honour the request) is in the descriptions.
- Extensions: the `provider` routing preferences, the models endpoint, the statuses llmrouter
  answers besides the spec's (every operation: 408, 414 and 431 from the connection; a 405 for a
  method a path does not have, with `Allow`), the rate-limit and request-id headers, the stream's
  events, the tokenizer endpoints, the accounts endpoints (the caller's key, a past generation,
  key administration), and the config reload.
"""

from __future__ import annotations

import copy
from typing import Any

from llmrouter.openapi._accounts import add_accounts
from llmrouter.openapi._admin import add_admin
from llmrouter.openapi._chat import add_chat
from llmrouter.openapi._completions import add_completions, add_models
from llmrouter.openapi._schema import as_openapi_3_2, error, shared_spec
from llmrouter.openapi._tokenize import add_tokenizer

__all__ = ["build_openapi", "shared_spec"]

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace", "query")

# What the connection itself refuses, on any path, before the app sees the request: status ->
# (the response's name in components/responses, its description).
_EDGE_RESPONSES = {
    "408": ("RequestTimeout", "The request's head or body came too slowly (`param`: which)"),
    "414": ("UriTooLong", "The request line is too long"),
    "431": ("HeadersTooLarge", "The request's headers are too large"),
}


def build_openapi() -> dict[str, Any]:
    spec = copy.deepcopy(shared_spec())
    spec["info"] = {
        "title": "llmrouter Completions API (and Chat Completions)",
        "version": "1.0.0",
        "description": (
            "The Completions API as llmrouter serves it. `param` in an error names the field at "
            "fault (`prompt[2]`, `max_tokens`) and is an empty string when no field is. "
            "`max_tokens` omitted means 16 (OpenAI's default); null means up to the model's "
            "remaining context. Parameters a model cannot honour are refused with a 400 naming "
            "them, never dropped. A method a path does not have is answered 405, its `Allow` "
            "header listing the methods the path has (components/responses/MethodNotAllowed)."
        ),
    }
    spec["servers"] = [{"url": "/api/v1", "description": "this llmrouter"}]
    spec["tags"] = [
        {"name": "completions"},
        {"name": "chat"},
        {"name": "models"},
        {"name": "tokenizer"},
        {"name": "accounts"},
        {"name": "admin"},
    ]
    add_completions(spec)
    add_chat(spec)
    add_models(spec)
    add_tokenizer(spec)
    add_accounts(spec)
    add_admin(spec)
    _add_edge_responses(spec)
    return as_openapi_3_2(spec)


def _add_edge_responses(spec: dict[str, Any]) -> None:
    """Answers that do not belong to one operation: the connection's refusals (on every
    operation) and the 405 of a method no operation has (a named response only)."""
    responses = spec["components"].setdefault("responses", {})
    responses["MethodNotAllowed"] = error(
        "The path has no such method",
        {
            "Allow": {
                "required": True,
                "schema": {"type": "string"},
                "description": "The methods the path has, e.g. `GET, DELETE`.",
            }
        },
    )
    for name, description in _EDGE_RESPONSES.values():
        responses[name] = error(description)
    edge = {
        status: {"$ref": f"#/components/responses/{name}"}
        for status, (name, _) in _EDGE_RESPONSES.items()
    }
    for path in spec["paths"].values():
        for method in _METHODS:
            if method in path:
                path[method]["responses"].update(edge)
