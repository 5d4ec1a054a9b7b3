"""The Chat Completions API on the wire (OpenAI's format), beside the Completions API: the request.

As in `wire/completions.py`, types state nullability and ranges field by field, so that a wrong
value is a 400 naming it; the rules that span fields are `validate.decode_chat_request`'s. The
router's own extensions are the same as on /completions: `models` (a fallback list), `provider`,
and OpenRouter's `reasoning` request object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from llmrouter.wire.completions import (
    MAX_USER_CHARS,
    ModelName,
    Penalty,
    ProviderPreferences,
    ResponseFormat,
    StreamOptions,
    Usage,
)
from llmrouter.wire.tools import Tool, ToolCall, ToolCallDelta, ToolChoice

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionCreateParams",
    "ChatLogprobs",
    "ChatMessage",
    "Delta",
    "DeveloperMessage",
    "ImagePart",
    "ReasoningRequest",
    "Reply",
    "SystemMessage",
    "TextPart",
    "TokenLogprob",
    "Tool",
    "ToolMessage",
    "TopLogprob",
    "UserMessage",
    "chat_request_decoder",
]


class TextPart(Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    text: str


class ImageURL(Struct, forbid_unknown_fields=True):
    url: Annotated[str, Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Struct, tag_field="type", tag="image_url", forbid_unknown_fields=True):
    image_url: ImageURL


class SystemMessage(Struct, tag_field="role", tag="system", forbid_unknown_fields=True):
    content: str | list[TextPart]
    name: str | UnsetType = UNSET


class DeveloperMessage(Struct, tag_field="role", tag="developer", forbid_unknown_fields=True):
    content: str | list[TextPart]
    name: str | UnsetType = UNSET


class UserMessage(Struct, tag_field="role", tag="user", forbid_unknown_fields=True):
    content: str | list[TextPart | ImagePart]
    name: str | UnsetType = UNSET


class AssistantMessage(Struct, tag_field="role", tag="assistant", forbid_unknown_fields=True):
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    refusal: str | None = None
    name: str | UnsetType = UNSET
    reasoning: str | None = None  # (OpenRouter's: an earlier turn's reasoning, sent back)


class ToolMessage(Struct, tag_field="role", tag="tool", forbid_unknown_fields=True):
    content: str | list[TextPart]
    tool_call_id: Annotated[str, Meta(min_length=1)]


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class ReasoningRequest(Struct, forbid_unknown_fields=True):
    """OpenRouter's `reasoning` object: how much the model may think, and whether the answer
    carries its thinking."""

    effort: Literal["minimal", "low", "medium", "high"] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    exclude: bool | None = None
    enabled: bool | None = None


class ChatCompletionCreateParams(Struct, forbid_unknown_fields=True, omit_defaults=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: ModelName | UnsetType = UNSET
    models: list[ModelName] | UnsetType = UNSET
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=0)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: Annotated[str, Meta(max_length=MAX_USER_CHARS)] | UnsetType = UNSET
    metadata: dict[str, Any] | None = None
    reasoning: ReasoningRequest | None = None
    provider: ProviderPreferences | None = None


chat_request_decoder = msgspec.json.Decoder(ChatCompletionCreateParams)


# ---------------------------------------------------------------------------------------------
# Response


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Reply(Struct, kw_only=True):
    """The assistant's message. `content` and `refusal` are always present (null when empty),
    as in OpenAI's answers; `reasoning` (OpenRouter's) only when the model thought aloud."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    reasoning: str | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET


ChatFinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class ChatChoice(Struct):
    index: int
    message: Reply
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason
    native_finish_reason: str | UnsetType = UNSET


class ChatCompletion(Struct, kw_only=True):  # kw_only: fields in OpenAI's order
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    provider: str
    system_fingerprint: str | UnsetType = UNSET
    choices: list[ChatChoice]
    usage: Usage | UnsetType = UNSET


class Delta(Struct, omit_defaults=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    refusal: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    native_finish_reason: str | UnsetType = UNSET


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    provider: str
    system_fingerprint: str | UnsetType = UNSET
    choices: list[ChatChunkChoice]
    # Present (null until the last chunk) only when stream_options.include_usage is set.
    usage: Usage | UnsetType | None = UNSET
