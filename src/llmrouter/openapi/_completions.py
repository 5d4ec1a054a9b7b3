"""`POST /completions` and `GET /models` as llmrouter serves them: the shared spec's operation,
corrected, made exact (every bound the router enforces) and extended (statuses, headers, events)."""

from __future__ import annotations

from typing import Any

from llmrouter.openapi._schema import (
    RATE_LIMIT_HEADERS,
    RETRY_AFTER_HEADER,
    constrain,
    error,
    json_response,
    ref,
    wire_bounds,
)
from llmrouter.wire.completions import (
    MAX_MODEL_CHARS,
    CompletionCreateParams,
    JSONSchemaConfig,
    ResponseFormatGrammar,
)
from llmrouter.wire.validate import (
    MAX_BIAS,
    METADATA_KEY_CHARS,
    METADATA_PAIRS,
    METADATA_VALUE_CHARS,
    TOKEN_ID,
)

__all__ = ["add_completions", "add_models"]

Schema = dict[str, Any]

# Every object of the request refuses fields it does not know (msgspec's forbid_unknown_fields).
_CLOSED_OBJECTS = (
    "CompletionCreateParams",
    "CompletionCreateParamsStreamOptions",
    "CompletionCreateParamsResponseFormat0",
    "CompletionCreateParamsResponseFormat1",
    "ResponseFormatJSONSchema",
    "JSONSchemaConfig",
    "ResponseFormatTextGrammar",
    "CompletionCreateParamsResponseFormat4",
    "ProviderPreferences",
)


def add_completions(spec: Schema) -> None:
    schemas = spec["components"]["schemas"]
    _correct(schemas)
    _add_provider_preferences(schemas)
    _bound_the_request(schemas)
    _add_stream_chunks(schemas)
    operation = spec["paths"]["/completions"]["post"]
    operation["tags"] = ["completions"]
    _answer_in_both_media_types(operation["responses"]["200"])
    _add_statuses(operation["responses"])


def _correct(schemas: Schema) -> None:
    """The first echoed token's logprob and top_logprobs are null, as OpenAI sends them; usage
    has OpenAI's details where the provider reports them."""
    logprobs = schemas["CompletionLogprobs"]["properties"]
    logprobs["token_logprobs"]["items"]["nullable"] = True
    logprobs["top_logprobs"]["items"]["nullable"] = True
    refusal = {
        "type": "boolean",
        "description": "Present (true) when the text is the model's refusal (a chat API's `refusal`).",
    }
    schemas["CompletionChoice"]["properties"]["refusal"] = refusal
    usage = schemas["CompletionUsage"]["properties"]
    for name, field, what in (
        ("prompt_tokens_details", "cached_tokens", "Of the prompt tokens, those read from the cache."),
        ("completion_tokens_details", "reasoning_tokens", "Of the completion tokens, the thinking."),
    ):
        usage[name] = {
            "type": "object",
            "description": "Where the provider reports it.",
            "required": [field],
            "properties": {field: {"type": "integer", "description": what}},
        }


def _add_provider_preferences(schemas: Schema) -> None:
    names = {"type": "array", "items": {"type": "string"}, "nullable": True}
    schemas["ProviderPreferences"] = {
        "type": "object",
        "description": (
            "llmrouter extension (OpenRouter's `provider` object): which of the router's "
            "providers may serve this request, and in what order. Names are provider names of "
            "the router's config; an unknown name is a 400, and so are preferences that leave no "
            "deployment of the requested models."
        ),
        "properties": {
            "order": {**names, "description": "Try these providers first, in this order."},
            "only": {**names, "description": "Use no others."},
            "ignore": {**names, "description": "Never these."},
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
    params["provider"] = {"nullable": True, "oneOf": [ref("ProviderPreferences")]}


def _bound_the_request(schemas: Schema) -> None:
    """What the router refuses with a 400, as the schema's own keywords: msgspec's bounds (read
    off the wire types) and the rules of wire/validate.py that a schema can state."""
    request = schemas["CompletionCreateParams"]
    params = request["properties"]
    constrain(request, CompletionCreateParams)
    constrain(schemas["JSONSchemaConfig"], JSONSchemaConfig)
    constrain(schemas["ResponseFormatTextGrammar"], ResponseFormatGrammar)
    grammar = schemas["ResponseFormatTextGrammar"]["properties"]["grammar"]
    grammar.update(format="gbnf", description="A GBNF grammar (llama.cpp's); its start rule is `root`.")
    for name in _CLOSED_OBJECTS:
        schemas[name]["additionalProperties"] = False
    # Ids must not be empty (validate.py), nor longer than any model id may be.
    schemas["ModelName"] = {**schemas["ModelName"], "minLength": 1, "maxLength": MAX_MODEL_CHARS}
    _bound_the_prompt(schemas["CompletionCreateParamsPrompt"])
    stops = schemas["CompletionCreateParamsStop"]["oneOf"]
    stops[0]["minLength"] = 1  # a stop sequence must not be empty
    stops[1]["items"]["minLength"] = 1
    stops[1].update(wire_bounds(CompletionCreateParams)["stop"]["array"])
    params["logit_bias"]["propertyNames"] = {"pattern": f"^{TOKEN_ID.pattern}$"}
    params["logit_bias"]["additionalProperties"].update(minimum=-MAX_BIAS, maximum=MAX_BIAS)
    params["metadata"]["maxProperties"] = METADATA_PAIRS
    params["metadata"]["propertyNames"] = {"maxLength": METADATA_KEY_CHARS}
    params["metadata"]["additionalProperties"]["maxLength"] = METADATA_VALUE_CHARS
    # Only a stream has options: `stream_options` (not null) needs `stream: true`.
    request["if"] = {
        "required": ["stream_options"],
        "properties": {"stream_options": {"type": "object"}},
    }
    request["then"] = {"required": ["stream"], "properties": {"stream": {"const": True}}}
    _describe_what_no_schema_says(params)


def _bound_the_prompt(prompt: Schema) -> None:
    """A list prompt holds at least one item, a token-id prompt at least one id; ids are integers
    from 0 (the spec's `number` would allow 1.5)."""
    token = {"type": "integer", "minimum": 0}
    strings, tokens, batches = prompt["oneOf"][1:]
    strings["minItems"] = 1
    tokens.update(items=token, minItems=1)
    batches.update(items={"type": "array", "items": token, "minItems": 1}, minItems=1)


def _describe_what_no_schema_says(params: Schema) -> None:
    """Rules a schema cannot state: they are refused with a 400 naming the field."""
    params["best_of"]["description"] = (
        "At least `n` (a 400 otherwise), and with `stream` equal to `n`: the best choices are "
        "known only at the end."
    )
    params["response_format"]["description"] = (
        "`json_schema.schema` must be a JSON Schema the router can check (no `$ref` outside it; "
        "within the `checks:` limits on nesting, size and patterns), and `grammar` a GBNF grammar "
        "within the same limits; else a 400. A deployment that cannot honour the format is left "
        "out of the plan (a 400 when none is left)."
    )
    params["user"]["description"] = "An identifier of the end user, kept in the ledger."
    params["models"]["description"] = (
        "Fallback models, tried in order after `model` when it cannot answer (provider errors, "
        "timeouts, rate limits, a prompt too long for its context, a content refusal)."
    )


def _add_stream_chunks(schemas: Schema) -> None:
    """The chunk a stream's `data:` events carry (wire/completions.py's CompletionChunk)."""
    schemas["CompletionChunkChoice"] = {
        "type": "object",
        "description": "One choice's delta; `finish_reason` is set only in the choice's last one.",
        "required": ["text", "index", "logprobs", "finish_reason"],
        "properties": {
            "text": {"type": "string"},
            "index": {"type": "integer"},
            "logprobs": {"nullable": True, "oneOf": [ref("CompletionLogprobs")]},
            "finish_reason": {"nullable": True, "oneOf": [ref("CompletionFinishReason")]},
            "native_finish_reason": {"type": "string"},
            "reasoning": {"type": "string", "nullable": True},
            "refusal": {"type": "boolean", "description": "As in CompletionChoice."},
        },
    }
    schemas["CompletionChunk"] = {
        "type": "object",
        "required": ["id", "object", "created", "model", "provider", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "provider": {"type": "string"},
            "system_fingerprint": {"type": "string"},
            "choices": {"type": "array", "items": ref("CompletionChunkChoice")},
            "usage": {
                "nullable": True,
                "oneOf": [ref("CompletionUsage")],
                "description": "With `stream_options.include_usage`: null until the last chunk.",
            },
        },
    }


def _answer_in_both_media_types(ok: Schema) -> None:
    ok["content"]["text/event-stream"] = {
        "itemSchema": {
            "type": "object",
            "description": (
                "With `stream: true`, each event is `data: {chunk}` (a CompletionChunk: choices "
                "carry text deltas), a last chunk with empty `choices` and `usage` when "
                "`stream_options.include_usage` is set, then `data: [DONE]`. An error after the "
                "stream started is one `data:` event holding an ErrorResponse, and the stream "
                "ends without [DONE]. Comment lines (`: llmrouter processing`) keep a quiet "
                "stream alive."
            ),
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "if": {"const": "[DONE]"},
                    "else": {
                        "contentMediaType": "application/json",
                        "contentSchema": {"oneOf": [ref("CompletionChunk"), ref("ErrorResponse")]},
                    },
                }
            },
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
        **RATE_LIMIT_HEADERS,
    }


def _add_statuses(responses: Schema) -> None:
    """The statuses llmrouter answers besides the spec's, and its headers on those it shares."""
    responses["400"] = error(responses["400"]["description"])
    responses["401"] = error(responses["401"]["description"])
    responses["429"] = error(
        "Over the key's or token's requests, tokens or concurrent requests per minute (see "
        "Retry-After and X-RateLimit-*); or its credit is held by requests in flight (`code: "
        "credit_held`, retry after one finishes); or (code `upstream_rate_limited`) every "
        "deployment's upstream rate-limited the request",
        {**RETRY_AFTER_HEADER, **RATE_LIMIT_HEADERS},
    )
    responses["500"] = error(responses["500"]["description"])
    responses["402"] = error(
        "llmrouter addition: the key's or token's credit limit is spent for this period "
        "(`type: insufficient_credits`, `code: credit_limit_exceeded`)"
    )
    responses["403"] = error(
        "The key or token may not use the requested model (`code: model_not_allowed`, `param` names it)"
    )
    responses["404"] = error("Unknown model")
    responses["413"] = error("Request body over the size limit")
    responses["415"] = error("Body not sent as application/json")
    responses["502"] = error(
        "The provider failed or rejected llmrouter's credentials; or (`type: invalid_output`) no "
        "answer satisfied `response_format`, after asking again and trying the request's other "
        "models"
    )
    responses["503"] = error(
        "No capable deployment can take the request now (see Retry-After): all are ejected, "
        "inside an upstream's Retry-After, or their queue is full; or the usage ledger or the "
        "database cannot keep up",
        RETRY_AFTER_HEADER,
    )
    responses["504"] = error("The provider did not answer in time")


def add_models(spec: Schema) -> None:
    schemas = spec["components"]["schemas"]
    schemas["ModelList"] = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": ref("Model")},
        },
    }
    schemas["Model"] = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by", "context_length", "supported_parameters"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "context_length": {"type": "integer", "nullable": True},
            "supported_parameters": {"type": "array", "items": {"type": "string"}},
        },
    }
    spec["paths"]["/models"] = {
        "get": {
            "operationId": "list-models",
            "summary": "List the models this router serves",
            "tags": ["models"],
            "responses": {
                "200": json_response("The models", ref("ModelList")),
                "400": error("The Authorization header sent more than once"),
                "401": error("Unauthorized - invalid API key"),
                "503": error("The database cannot be reached", RETRY_AFTER_HEADER),
            },
        }
    }
