"""The OpenAPI document this server serves: the shared spec, corrected and extended.

Corrections: `tags` was a nested array (not valid OpenAPI 3.0); the first echoed token's logprob and
top_logprobs are null, as OpenAI sends them. Extensions: the `provider` routing preferences, the models
endpoint, the statuses llmrouter answers besides the spec's (402, 403, 404, 405, 413, 415, 502, 503,
504), the rate-limit headers, the stream's media type, and the accounts endpoints (the caller's key,
a past generation, key administration).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

from llmrouter.wire.completions import MAX_MODEL_CHARS, MAX_USER_CHARS

__all__ = ["build_openapi", "shared_spec"]


def shared_spec() -> dict[str, Any]:
    text = resources.files("llmrouter.spec").joinpath("completions.openapi.json").read_text()
    spec: dict[str, Any] = json.loads(text)
    return spec


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


_RATE_LIMIT_HEADERS: dict[str, Any] = {
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


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _add_accounts(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    nullable_int = {"type": "integer", "nullable": True}
    schemas["Limits"] = {
        "type": "object",
        "description": "null: no such limit.",
        "properties": {
            "rpm": nullable_int,
            "tpm": nullable_int,
            "max_concurrent": nullable_int,
            "credit_limit": {"type": "number", "nullable": True},
            "reset": {"type": "string", "enum": ["daily", "weekly", "monthly"], "nullable": True},
        },
    }
    models = {"type": "array", "items": {"type": "string"}, "nullable": True}
    schemas["Key"] = {
        "type": "object",
        "required": ["id", "name", "status", "admin", "created_at", "limits"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "owner": {"type": "string", "nullable": True},
            "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
            "admin": {"type": "boolean"},
            "created_at": {"type": "integer"},
            "expires_at": nullable_int,
            "revoked_at": nullable_int,
            "limits": {"$ref": "#/components/schemas/Limits"},
            "models": models,
        },
    }
    schemas["KeyCreate"] = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "owner": {"type": "string", "nullable": True},
            "rpm": nullable_int,
            "tpm": nullable_int,
            "max_concurrent": nullable_int,
            "credit_limit": {"type": "number", "nullable": True},
            "reset": {"type": "string", "enum": ["daily", "weekly", "monthly"], "nullable": True},
            "models": models,
            "expires_at": nullable_int,
            "admin": {"type": "boolean"},
        },
    }
    key_and_secret = {
        "type": "object",
        "properties": {
            "data": {"$ref": "#/components/schemas/Key"},
            "key": {"type": "string", "description": "The secret; shown only here."},
        },
    }
    schemas["Generation"] = {
        "type": "object",
        "description": "One request's ledger record.",
        "properties": {
            name: {"type": kind, "nullable": True}
            for name, kind in (
                ("id", "string"),
                ("principal", "string"),
                ("user", "string"),
                ("model_requested", "string"),
                ("model", "string"),
                ("provider", "string"),
                ("prompt_tokens", "integer"),
                ("completion_tokens", "integer"),
                ("cost", "number"),
                ("latency_ms", "number"),
                ("ttft_ms", "number"),
                ("status", "integer"),
                ("error", "string"),
                ("finish_reason", "string"),
                ("stream", "boolean"),
                ("created_at", "number"),
                ("finished_at", "number"),
            )
        }
        | {
            "metadata": {"type": "object", "nullable": True},
            "attempts": {"type": "array", "items": {"type": "string"}},
        },
    }
    unauthorised = _error("Unauthorized - invalid API key or token")
    forbidden = _error("Not an admin key")
    key_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    one_key = _json_response(
        "The key", {"type": "object", "properties": {"data": {"$ref": "#/components/schemas/Key"}}}
    )
    spec["paths"]["/key"] = {
        "get": {
            "operationId": "get-key",
            "summary": "The calling key's or token's limits, usage and remaining credit",
            "tags": ["accounts"],
            "responses": {
                "200": _json_response("The caller", {"type": "object"}),
                "401": unauthorised,
            },
        }
    }
    spec["paths"]["/generation"] = {
        "get": {
            "operationId": "get-generation",
            "summary": "One past request's record: for the key or token that made it, or an admin",
            "tags": ["accounts"],
            "parameters": [
                {"name": "id", "in": "query", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _json_response(
                    "The record",
                    {
                        "type": "object",
                        "properties": {"data": {"$ref": "#/components/schemas/Generation"}},
                    },
                ),
                "400": _error("No id given"),
                "401": unauthorised,
                "404": _error("No such generation for this caller"),
            },
        }
    }
    spec["paths"]["/keys"] = {
        "get": {
            "operationId": "list-keys",
            "summary": "List keys (admin); `?all=true` includes revoked ones",
            "tags": ["accounts"],
            "responses": {
                "200": _json_response(
                    "The keys",
                    {
                        "type": "object",
                        "properties": {
                            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}}
                        },
                    },
                ),
                "401": unauthorised,
                "403": forbidden,
            },
        },
        "post": {
            "operationId": "create-key",
            "summary": "Create a key (admin); its secret is in the answer, once",
            "tags": ["accounts"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/KeyCreate"}}},
            },
            "responses": {
                "201": _json_response("The new key", key_and_secret),
                "400": _error("Bad body"),
                "401": unauthorised,
                "403": forbidden,
            },
        },
    }
    spec["paths"]["/keys/{id}"] = {
        "get": {
            "operationId": "get-key-by-id",
            "summary": "One key (admin)",
            "tags": ["accounts"],
            "parameters": key_id,
            "responses": {
                "200": one_key,
                "401": unauthorised,
                "403": forbidden,
                "404": _error("No such key"),
            },
        },
        "delete": {
            "operationId": "revoke-key",
            "summary": "Revoke a key (admin)",
            "tags": ["accounts"],
            "parameters": key_id,
            "responses": {
                "200": one_key,
                "401": unauthorised,
                "403": forbidden,
                "404": _error("No such key"),
            },
        },
    }
    spec["paths"]["/keys/{id}/rotate"] = {
        "post": {
            "operationId": "rotate-key",
            "summary": "A new secret for a key, same id and limits (admin); the old one stops working",
            "tags": ["accounts"],
            "parameters": key_id,
            "responses": {
                "200": _json_response("The key and its new secret", key_and_secret),
                "401": unauthorised,
                "403": forbidden,
                "404": _error("No such live key"),
            },
        }
    }


def build_openapi() -> dict[str, Any]:
    spec = copy.deepcopy(shared_spec())
    spec["info"] = {
        "title": "llmrouter Completions API",
        "version": "1.0.0",
        "description": (
            "The Completions API as llmrouter serves it. `param` in an error names the field at "
            "fault (`prompt[2]`, `max_tokens`) and is an empty string when no field is. "
            "`max_tokens` omitted means 16 (OpenAI's default); null means up to the model's "
            "remaining context. Parameters a model cannot honour are refused with a 400 naming "
            "them, never dropped."
        ),
    }
    spec["servers"] = [{"url": "/api/v1", "description": "this llmrouter"}]
    spec["tags"] = [{"name": "completions"}, {"name": "models"}, {"name": "accounts"}]
    schemas = spec["components"]["schemas"]
    logprobs = schemas["CompletionLogprobs"]["properties"]
    logprobs["token_logprobs"]["items"]["nullable"] = True
    logprobs["top_logprobs"]["items"]["nullable"] = True
    schemas["ProviderPreferences"] = {
        "type": "object",
        "description": (
            "llmrouter extension (OpenRouter's `provider` object): which of the router's "
            "providers may serve this request, and in what order. Names are provider names of "
            "the router's config; an unknown name is a 400."
        ),
        "properties": {
            "order": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Try these providers first, in this order.",
            },
            "only": {"type": "array", "items": {"type": "string"}, "description": "Use no others."},
            "ignore": {"type": "array", "items": {"type": "string"}, "description": "Never these."},
            "allow_fallbacks": {
                "type": "boolean",
                "nullable": True,
                "description": "false: only the providers in `order` (or only the first choice).",
            },
            "require_parameters": {
                "type": "boolean",
                "nullable": True,
                "description": (
                    "Accepted for compatibility; llmrouter always requires every parameter to be "
                    "honoured and never drops one."
                ),
            },
            "sort": {
                "type": "string",
                "enum": ["price", "latency", "throughput"],
                "nullable": True,
                "description": "Order deployments by this instead of the model's strategy.",
            },
            "resume": {
                "type": "boolean",
                "nullable": True,
                "description": (
                    "A stream that fails after its first token is continued on the next "
                    "deployment of the plan, sent the prompt and the text so far, so that the "
                    "client gets one uninterrupted answer (null: as the model's `resume_streams` "
                    "says). Only where continuing means the same answer: one string prompt, "
                    "`n` 1, no `logprobs`, `echo`, `suffix` or `response_format` other than "
                    "text; elsewhere the stream ends with an error event."
                ),
            },
        },
    }
    params = schemas["CompletionCreateParams"]["properties"]
    params["provider"] = {
        "nullable": True,
        "oneOf": [{"$ref": "#/components/schemas/ProviderPreferences"}],
    }
    # Free strings that reach the ledger and the log are bounded (wire/completions.py).
    params["user"] = {
        "type": "string",
        "maxLength": MAX_USER_CHARS,
        "description": "An identifier of the end user, kept in the ledger; at most 256 characters.",
    }
    schemas["ModelName"] = {**schemas["ModelName"], "maxLength": MAX_MODEL_CHARS}
    params["models"]["description"] = (
        "Fallback models, tried in order after `model` when it cannot answer (provider errors, "
        "timeouts, rate limits, a prompt too long for its context, a content refusal)."
    )
    schemas["ModelList"] = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    }
    schemas["Model"] = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "context_length": {"type": "integer", "nullable": True},
            "supported_parameters": {"type": "array", "items": {"type": "string"}},
        },
    }

    completions = spec["paths"]["/completions"]["post"]
    completions["tags"] = ["completions"]
    ok = completions["responses"]["200"]
    ok["content"]["text/event-stream"] = {
        "schema": {
            "type": "string",
            "description": (
                "With `stream: true`: `data: {chunk}` events shaped like CompletionResponse "
                "(choices carry text deltas; `finish_reason` is null until a choice ends), a last "
                "chunk with empty `choices` and `usage` when `stream_options.include_usage` is "
                "set, then `data: [DONE]`. An error after the stream started is one `data:` event "
                "holding an ErrorResponse, and the stream ends without [DONE]."
            ),
        }
    }
    ok["headers"] = {
        "X-Request-Id": {"schema": {"type": "string"}, "description": "The completion's id."},
        "X-Llmrouter-Attempts": {
            "schema": {"type": "string"},
            "description": "Each attempt: deployment, outcome, milliseconds.",
        },
        "X-Llmrouter-Emulated": {
            "schema": {"type": "string"},
            "description": (
                "The request fields llmrouter honoured itself for the deployment that answered "
                "(e.g. `n, stop`); absent when the deployment honoured all of them."
            ),
        },
    }
    responses = completions["responses"]
    ok["headers"].update(_RATE_LIMIT_HEADERS)
    responses["429"]["description"] = (
        "Over the key's or token's requests, tokens or concurrent requests per minute (see "
        "Retry-After and X-RateLimit-*); or its credit is held by requests in flight (`code: "
        "credit_held`, retry after one finishes); or (code `upstream_rate_limited`) every "
        "deployment's upstream rate-limited the request"
    )
    responses["429"]["headers"] = {
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."},
        **_RATE_LIMIT_HEADERS,
    }
    responses["402"] = _error(
        "llmrouter addition: the key's or token's credit limit is spent for this period "
        "(`type: insufficient_credits`, `code: credit_limit_exceeded`)"
    )
    responses["403"] = _error(
        "The key or token may not use the requested model (`code: model_not_allowed`, `param` names it)"
    )
    responses["404"] = _error("Unknown model")
    responses["413"] = _error("Request body over the size limit")
    responses["415"] = _error("Body not sent as application/json")
    responses["502"] = _error(
        "The provider failed or rejected llmrouter's credentials; or (`type: invalid_output`) no "
        "answer satisfied `response_format`, after asking again and trying the request's other "
        "models"
    )
    responses["503"] = _error(
        "No capable deployment can take the request now (see Retry-After): all are ejected, "
        "inside an upstream's Retry-After, or their queue is full"
    )
    responses["504"] = _error("The provider did not answer in time")

    _add_accounts(spec)
    spec["paths"]["/models"] = {
        "get": {
            "operationId": "list-models",
            "summary": "List the models this router serves",
            "tags": ["models"],
            "responses": {
                "200": {
                    "description": "The models",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}
                    },
                },
                "401": _error("Unauthorized - invalid API key"),
            },
        }
    }
    return spec
