"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`: a model's own tokenizer, in
vLLM's shapes (api/tokenize.py). Served under /api/v1 (the document's server), /v1 and the root."""

from __future__ import annotations

from typing import Any

from llmrouter.openapi._schema import (
    RATE_LIMIT_HEADERS,
    RETRY_AFTER_HEADER,
    error,
    json_response,
    ref,
)
from llmrouter.wire.completions import MAX_MODEL_CHARS

__all__ = ["add_tokenizer"]

Schema = dict[str, Any]

_MODEL: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_MODEL_CHARS,
    "description": "A model id or alias; left out: the router's default model (as vLLM's clients do).",
}
_TOKEN: Schema = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def add_tokenizer(spec: Schema) -> None:
    schemas = spec["components"]["schemas"]
    schemas["TokenizeRequest"] = {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {
                "type": "string",
                "description": "Read exactly as a /completions string prompt is read by the model.",
            },
            "model": _MODEL,
            "add_special_tokens": {
                "type": "boolean",
                "default": True,
                "description": "The tokens the tokenizer puts around a text (a document start).",
            },
            "return_token_strs": {
                "type": "boolean",
                "default": False,
                "description": "Each token's text too, control tokens spelled out.",
            },
        },
    }
    schemas["TokenizeResponse"] = {
        "type": "object",
        "required": ["count", "max_model_len", "tokens", "token_strs"],
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "max_model_len": {
                "type": "integer",
                "minimum": 1,
                "nullable": True,
                "description": "The model's context length, as the router knows it.",
            },
            "tokens": {"type": "array", "items": _TOKEN},
            "token_strs": {"type": "array", "items": {"type": "string"}, "nullable": True},
        },
    }
    schemas["DetokenizeRequest"] = {
        "type": "object",
        "required": ["tokens"],
        "additionalProperties": False,
        "properties": {
            "tokens": {
                "type": "array",
                "items": {**_TOKEN, "maximum": 2**63 - 1},
                "description": "Token ids of the model's vocabulary (another is a 400 naming it).",
            },
            "model": _MODEL,
        },
    }
    schemas["DetokenizeResponse"] = {
        "type": "object",
        "required": ["prompt"],
        "properties": {"prompt": {"type": "string"}},
    }
    schemas["TokenizerInfo"] = {
        "type": "object",
        "description": (
            "The tokenizer's configuration, in the names of vLLM's /tokenizer_info (an upstream "
            "vLLM's own answer, with `model` added)."
        ),
        "required": ["model"],
        "properties": {
            "model": {"type": "string"},
            "bos_token": {"type": "string", "nullable": True},
            "eos_token": {"type": "string", "nullable": True},
            "chat_template": {"type": "string", "nullable": True},
            "model_max_length": {"type": "integer", "nullable": True},
        },
    }
    paths = spec["paths"]
    paths["/tokenize"] = {
        "post": _operation(
            "tokenize",
            "Tokenize a prompt as the model reads it",
            ref("TokenizeRequest"),
            json_response("The tokens", ref("TokenizeResponse"), RATE_LIMIT_HEADERS),
        )
    }
    paths["/detokenize"] = {
        "post": _operation(
            "detokenize",
            "The text of token ids",
            ref("DetokenizeRequest"),
            json_response("The text", ref("DetokenizeResponse"), RATE_LIMIT_HEADERS),
        )
    }
    info = _operation(
        "tokenizer-info",
        "The model's tokenizer configuration",
        None,
        json_response("The configuration", ref("TokenizerInfo"), RATE_LIMIT_HEADERS),
    )
    info["parameters"] = [{"name": "model", "in": "query", "required": False, "schema": _MODEL}]
    paths["/tokenizer_info"] = {"get": info}


def _operation(name: str, summary: str, body: Schema | None, ok: Schema) -> Schema:
    operation: Schema = {
        "operationId": name,
        "summary": summary,
        "tags": ["tokenizer"],
        "responses": {
            "200": ok,
            "400": error(
                "Invalid request (`param` names the field); or the model has no tokenizer the "
                "router reaches (`param: model`; local models and upstreams that declare one); "
                "or the upstream's tokenizer called the request bad"
            ),
            "401": error("Unauthorized - invalid API key"),
            "402": error("The key's or token's credit limit is spent for this period"),
            "403": error("The key or token may not use the model (`param: model`)"),
            "404": error("Unknown model"),
            "429": error(
                "Over the key's or token's requests or concurrent requests per minute (see "
                "Retry-After and X-RateLimit-*); or the upstream rate-limited the request",
                {**RETRY_AFTER_HEADER, **RATE_LIMIT_HEADERS},
            ),
            "502": error("The upstream's tokenizer failed or answered something malformed"),
            "503": error(
                "No deployment of the model with a tokenizer can answer now (a local model that "
                "did not load); or the database cannot be reached",
                RETRY_AFTER_HEADER,
            ),
            "504": error("The upstream's tokenizer did not answer in time, or the deadline passed"),
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        operation["responses"]["413"] = error("Request body over the size limit")
        operation["responses"]["415"] = error("Body not sent as application/json")
    return operation
