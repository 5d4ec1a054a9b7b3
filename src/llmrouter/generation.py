"""What a request asks of a model, apart from the wire it came in on.

The edge decodes its wire format (the Completions API's `CompletionCreateParams`; the chat
endpoint's, next) and splits it in two: the `Route` (which models, which providers: what the plan
and the executor read) and the `Generation` (the input, sampling, stops, format, output cap: what
the emulation layer shapes and each adapter translates into its own wire format). Nothing past the
edge sees a wire type of the client's, so a second API is a second decoder and encoder on the same
road, not a second road.

A `Generation`'s field names are the Completions API's where it has one (`max_tokens`, `stop`,
`logprobs`...), so that a capability and the 400 that names a parameter mean the same field
whichever endpoint it came in on.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from msgspec import UNSET, Struct, UnsetType

from llmrouter.wire.completions import ProviderPreferences, ResponseFormat
from llmrouter.wire.tools import FunctionDefinition, ToolCall, ToolChoice
from llmrouter.wire.validate import Prompts

if TYPE_CHECKING:
    from llmrouter.wire.chat import ChatCompletionCreateParams, ImagePart, ReasoningRequest
    from llmrouter.wire.completions import CompletionCreateParams

__all__ = [
    "LEAST_THINKING",
    "MOST_THINKING",
    "Generation",
    "Image",
    "Message",
    "Route",
    "from_chat",
    "from_completions",
]


class Image(Struct, frozen=True, gc=False):
    """An image in a message: a URL (https, or a `data:` URL with the image in it), where it
    came in the request (a refusal names it), and its place among the message's text."""

    url: str
    detail: str | None
    param: str  # `messages[0].content[1]`
    media_type: str | None = None  # a data URL's (image/png), checked at the edge
    data: str | None = None  # a data URL's base64


class Message(Struct, frozen=True, gc=False):
    """One turn of a conversation (the chat endpoint's input). `system` and `developer` are
    instructions; each chat kind puts them where its API takes them. An assistant turn may call
    tools (`tool_calls`); a `tool` turn is one call's result (`tool_call_id`, and the function's
    `name`, which some APIs want beside the id)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # a tool result's function, or a participant's name
    # A message with images: its parts in order (text as str), for the APIs that take them;
    # `content` is its text alone.
    parts: tuple[str | Image, ...] = ()


class Generation(Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One request's ask of a model: a prompt (or several) or a conversation, and how to answer.
    (Not tracked by the cyclic GC: it holds the client's data, which never refers back to it.)"""

    prompts: Prompts = ()  # or:
    messages: tuple[Message, ...] = ()
    # Omitted: the Completions API's 16; None: up to the model's context.
    max_tokens: int | UnsetType | None = UNSET
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    user: str | UnsetType = UNSET
    metadata: dict[str, Any] | None = None
    stream: bool = False
    include_usage: bool = False  # usage at the end of a stream
    # The functions the model may call (chat only), and how it may: `tool_choice` as OpenAI's
    # (a name forces that function), `parallel_tool_calls` false for at most one call.
    tools: tuple[FunctionDefinition, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # How much the model may think (OpenRouter's object: effort, a budget, on or off), each kind
    # its own knob; `exclude` leaves the thinking out of the answer (the router does it).
    reasoning: ReasoningRequest | None = None


# A thinking budget as the router sends it: at least the least a kind takes (Anthropic's 1,024),
# and for an effort at most this (the credit hold counts an answer's thinking up to it).
LEAST_THINKING, MOST_THINKING = 1024, 32000


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request may go: the models it names (`model`, then `models`, OpenRouter's
    fallback list) and its provider preferences."""

    model: str | None = None
    models: tuple[str, ...] = ()
    provider: ProviderPreferences | None = None

    @property
    def resume(self) -> bool | None:
        """The request's own word on continuing a cut stream elsewhere (None: the model's)."""
        return None if self.provider is None else self.provider.resume


def from_completions(params: CompletionCreateParams, prompts: Prompts) -> tuple[Route, Generation]:
    """A decoded /completions request, split."""
    generation = Generation(
        prompts=prompts,
        max_tokens=params.max_tokens,
        n=params.n,
        best_of=params.best_of,
        echo=params.echo,
        suffix=params.suffix,
        logprobs=params.logprobs,
        **_shared(params),
    )
    return _route(params), generation


def from_chat(params: ChatCompletionCreateParams) -> tuple[Route, Generation]:
    """A decoded chat request, split."""
    from llmrouter.wire.chat import AssistantMessage, ImagePart, ToolMessage

    messages: list[Message] = []
    names: dict[str, str] = {}  # tool call id -> its function
    for i, m in enumerate(params.messages):
        content = m.content
        parts: tuple[str | Image, ...] = ()
        if isinstance(content, list):
            if any(isinstance(part, ImagePart) for part in content):
                parts = tuple(
                    _image(part, f"messages[{i}].content[{j}]")
                    if isinstance(part, ImagePart)
                    else part.text
                    for j, part in enumerate(content)
                )
            content = "\n".join(part.text for part in content if not isinstance(part, ImagePart))
        role = type(m).__struct_config__.tag  # (the tagged union's `role`)
        if isinstance(m, ToolMessage):
            tool = names.get(m.tool_call_id)
            messages.append(Message("tool", content or "", tool_call_id=m.tool_call_id, name=tool))
            continue
        name = m.name if isinstance(m.name, str) else None  # (a participant's name)
        calls: tuple[ToolCall, ...] = ()
        if isinstance(m, AssistantMessage) and m.tool_calls:
            names.update((call.id, call.function.name) for call in m.tool_calls)
            calls = tuple(m.tool_calls)
        messages.append(Message(role, content or "", calls, name=name, parts=parts))  # type: ignore[arg-type]
    cap = params.max_completion_tokens if params.max_completion_tokens is not None else params.max_tokens
    generation = Generation(
        messages=tuple(messages),
        max_tokens=cap,  # none: up to the model's context, as OpenAI's chat API means it
        n=params.n,
        logprobs=(params.top_logprobs or 0) if params.logprobs else None,
        tools=tuple(t.function for t in params.tools or ()),
        tool_choice=params.tool_choice,
        parallel_tool_calls=params.parallel_tool_calls,
        reasoning=params.reasoning,
        **_shared(params),
    )
    return _route(params), generation


# The image types every vision API takes (OpenAI's, Anthropic's and Gemini's common ground).
_DATA_URL = re.compile(r"data:(image/(?:png|jpeg|gif|webp));base64,", re.IGNORECASE)


def _image(part: ImagePart, param: str) -> Image:
    """An image part; a `data:` URL must hold a base64 image (the APIs that take images inline
    want its type and data apart)."""
    from llmrouter.errors import InvalidRequest

    url = part.image_url.url
    if not url.startswith("data:"):
        if not url.startswith(("https://", "http://")):
            raise InvalidRequest("An image's `url` is an http(s) URL or a data: URL.", param=param)
        return Image(url, part.image_url.detail, param)
    header = _DATA_URL.match(url)
    if header is None:
        raise InvalidRequest(
            "An image's data: URL must be `data:image/<png|jpeg|gif|webp>;base64,<data>`.",
            param=param,
        )
    data = url[header.end() :]
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        raise InvalidRequest(
            "An image's data: URL holds data that is not base64.", param=param
        ) from None
    return Image(url, part.image_url.detail, param, header.group(1).lower(), data)


def _route(params: CompletionCreateParams | ChatCompletionCreateParams) -> Route:
    return Route(
        params.model if isinstance(params.model, str) else None,
        tuple(params.models) if isinstance(params.models, list) else (),
        params.provider,
    )


def _shared(params: CompletionCreateParams | ChatCompletionCreateParams) -> dict[str, Any]:
    """The fields both APIs have, with the same meaning."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "logit_bias": params.logit_bias,
        "stop": params.stop,
        "response_format": params.response_format,
        "user": params.user,
        "metadata": params.metadata,
        "stream": params.stream,
        "include_usage": params.stream_options is not None and bool(params.stream_options.include_usage),
    }
