"""The Completions API on the wire: the spec's request, response and stream-chunk shapes.

Types follow `completions.openapi.json` field by field, including nullability: a field the spec marks
nullable is `X | None`, one it does not is plain `X`, so `{"user": null}` is a 400 like any other type
error. Ranges live in the `Annotated` constraints; rules that span fields live in `validate.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from llmrouter.wire.tools import ToolCall, ToolCallDelta

__all__ = [
    "MAX_MODEL_CHARS",
    "MAX_USER_CHARS",
    "ChunkChoice",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionCreateParams",
    "CompletionResponse",
    "CompletionTokensDetails",
    "Logprobs",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "ProviderPreferences",
    "ResponseFormat",
    "ResponseFormatGrammar",
    "ResponseFormatJSONObject",
    "ResponseFormatJSONSchema",
    "ResponseFormatPython",
    "ResponseFormatText",
    "Usage",
]

# `tool_calls` only on the chat endpoint (a /completions request has no tools).
FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]

# ---------------------------------------------------------------------------------------------
# Request


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None


class JSONSchemaConfig(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | UnsetType = UNSET
    schema: dict[str, Any] | UnsetType = UNSET
    strict: bool | None = None


class ResponseFormatText(Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    pass


class ResponseFormatJSONObject(Struct, tag_field="type", tag="json_object", forbid_unknown_fields=True):
    pass


class ResponseFormatJSONSchema(Struct, tag_field="type", tag="json_schema", forbid_unknown_fields=True):
    json_schema: JSONSchemaConfig


class ResponseFormatGrammar(Struct, tag_field="type", tag="grammar", forbid_unknown_fields=True):
    grammar: Annotated[str, Meta(min_length=1)]


class ResponseFormatPython(Struct, tag_field="type", tag="python", forbid_unknown_fields=True):
    pass


ResponseFormat = (
    ResponseFormatText
    | ResponseFormatJSONObject
    | ResponseFormatJSONSchema
    | ResponseFormatGrammar
    | ResponseFormatPython
)


class ProviderPreferences(Struct, forbid_unknown_fields=True):
    """OpenRouter's `provider` object, an llmrouter extension to the spec. Names are the provider
    names of the router's config."""

    order: list[str] | None = None  # try these providers first, in this order
    only: list[str] | None = None  # use no others
    ignore: list[str] | None = None  # never use these
    allow_fallbacks: bool | None = None  # false: only `order`'s providers (or only the first)
    # llmrouter always behaves as `true`: it never drops a parameter. Accepted for compatibility.
    require_parameters: bool | None = None
    sort: Literal["price", "latency", "throughput"] | None = None  # instead of the model's strategy
    # A llmrouter extension: continue a stream that fails mid-way on the next deployment (null:
    # as the model's `resume_streams` says).
    resume: bool | None = None


TokenId = Annotated[int, Meta(ge=0)]
# A prompt element: a string (batch of strings), a token id, or a token-id array. Which of the four
# spec shapes the whole prompt is, and that it is not a mixture, is checked in validate.py.
PromptItem = str | TokenId | list[TokenId]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
# Free strings that reach the ledger and the log are bounded: a model id (configured ids are held
# to the same bound) and `user` (OpenAI's end-user identifier; 256 characters, as its guides use).
MAX_MODEL_CHARS = 256
MAX_USER_CHARS = 256
ModelName = Annotated[str, Meta(max_length=MAX_MODEL_CHARS)]


class CompletionCreateParams(Struct, forbid_unknown_fields=True, omit_defaults=True):
    prompt: str | list[PromptItem]
    model: ModelName | UnsetType = UNSET
    models: list[ModelName] | UnsetType = UNSET
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    # Values of these two maps are checked in validate.py, where the error can name the key.
    logit_bias: dict[str, Any] | None = None
    logprobs: Annotated[int, Meta(ge=0)] | None = None
    # Omitted means OpenAI's default of 16; an explicit null means "up to the model's context".
    max_tokens: Annotated[int, Meta(ge=0)] | UnsetType | None = UNSET
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    user: Annotated[str, Meta(max_length=MAX_USER_CHARS)] | UnsetType = UNSET
    metadata: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    provider: ProviderPreferences | None = None


# ---------------------------------------------------------------------------------------------
# Response


class Logprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(Struct):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: FinishReason
    native_finish_reason: str | UnsetType = UNSET
    reasoning: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET  # (chat only: the functions the model called)
    refusal: bool | UnsetType = UNSET  # the text is the model's refusal (OpenAI's `refusal`)


class PromptTokensDetails(Struct):
    cached_tokens: int  # of the prompt tokens, read from the provider's cache


class CompletionTokensDetails(Struct):
    reasoning_tokens: int  # of the completion tokens, the model's thinking


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Where the provider reports them (OpenAI's names).
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET


class CompletionResponse(Struct, kw_only=True):  # kw_only: fields in OpenAI's order
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    provider: str
    system_fingerprint: str | UnsetType = UNSET
    choices: list[CompletionChoice]
    usage: Usage | UnsetType = UNSET


class ChunkChoice(Struct, gc=False):
    """One choice's delta in a stream chunk; `finish_reason` is set only in the choice's last one.
    (Made for every part of every stream, and never part of a cycle: not tracked by the cyclic
    GC, which makes it cheaper to make and the collections fewer.)"""

    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    native_finish_reason: str | UnsetType = UNSET
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET  # (chat only)
    refusal: bool | UnsetType = UNSET  # the text is the model's refusal


class CompletionChunk(Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    provider: str
    system_fingerprint: str | UnsetType = UNSET
    choices: list[ChunkChoice]
    # Present (null until the last chunk) only when stream_options.include_usage is set.
    usage: Usage | UnsetType | None = UNSET


# ---------------------------------------------------------------------------------------------
# Models


class ModelCard(Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int | None
    supported_parameters: list[str]


class ModelList(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


request_decoder = msgspec.json.Decoder(CompletionCreateParams)
encoder = msgspec.json.Encoder()
