"""The OpenAPI document this server serves: the shared spec, corrected and extended.

Corrections: `tags` was a nested array (not valid OpenAPI 3.0); the first echoed token's logprob and
top_logprobs are null, as OpenAI sends them. Extensions: the `provider` routing preferences, the models
endpoint, the statuses llmrouter answers besides the spec's (404, 405, 413, 415, 502, 503, 504), and
the stream's media type.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

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
    spec["tags"] = [{"name": "completions"}, {"name": "models"}]
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
        },
    }
    params = schemas["CompletionCreateParams"]["properties"]
    params["provider"] = {
        "nullable": True,
        "oneOf": [{"$ref": "#/components/schemas/ProviderPreferences"}],
    }
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
