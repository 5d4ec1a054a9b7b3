"""The `openai_chat` provider: any OpenAI-compatible `/chat/completions` (OpenAI, Groq, DeepSeek,
Mistral, Together, Fireworks, OpenRouter, vLLM...). The prompt is one user message; the message
comes back as the choice's text, its per-token logprobs in the Completions shape (with
`text_offset` counted here), `reasoning` / `reasoning_content` as `choices[].reasoning`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from llmrouter.errors import LlmrouterError, UpstreamUnavailable
from llmrouter.generation import Image, Message
from llmrouter.providers import _http, _schemas
from llmrouter.providers._common import (
    HttpAdapter,
    LogprobsBuilder,
    Seen,
    conversation,
    max_tokens_for,
    missing_logprobs,
    own_id,
    with_budget,
)
from llmrouter.providers.base import (
    ALL_PARAMETERS,
    Call,
    Capabilities,
    Completion,
    StreamPart,
    normalise_finish_reason,
)
from llmrouter.providers.openai import openai_error
from llmrouter.settings import CheckSettings, DeploymentSettings, OpenAIChatProvider
from llmrouter.structured import format_kind
from llmrouter.wire.completions import (
    ChunkChoice,
    CompletionChoice,
    CompletionTokensDetails,
    Logprobs,
    PromptTokensDetails,
    Usage,
    encoder,
)
from llmrouter.wire.tools import FunctionCall, FunctionDelta, ToolCall, ToolCallDelta, function_fields

__all__ = ["OpenAIChatAdapter"]

# Passed on as they are (Completions and Chat Completions mean the same by them).
_EFFORT = frozenset({"effort"})  # OpenAI's `reasoning_effort`
_ALL_KNOBS = frozenset({"effort", "max_tokens", "enabled"})
_SAMPLING = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "n")


class _Function(Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(Struct):  # a whole call, or a stream's piece of one
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Message(Struct):  # a whole message, or a stream's delta
    content: str | None = None
    refusal: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Top(Struct):
    token: str
    logprob: float
    bytes: list[Annotated[int, Meta(ge=0, le=255)]] | None = None


class _Token(_Top):
    top_logprobs: list[_Top] = []


class _Logprobs(Struct):
    content: list[_Token] | None = None
    refusal: list[_Token] | None = None


class _Choice(Struct):
    index: int = 0
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _PromptDetails(Struct):
    cached_tokens: int | None = None


class _CompletionDetails(Struct):
    reasoning_tokens: int | None = None


class _Usage(Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Body(Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    system_fingerprint: str | None = None
    error: msgspec.Raw = msgspec.Raw()  # (not decoded here: it may be anything)


_decoder = msgspec.json.Decoder(_Body)


class OpenAIChatAdapter(HttpAdapter):
    settings: OpenAIChatProvider
    native = ALL_PARAMETERS - {"echo", "suffix", "best_of"}

    def __init__(
        self,
        name: str,
        settings: OpenAIChatProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
        transport: _http.Transport | None = None,
    ) -> None:
        super().__init__(name, settings, deployments, checks, transport)
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._headers = self.headers(
            {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else None
        )

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        return self.chat_capabilities(
            deployment,
            response_formats=self.settings.response_formats,
            max_logprobs=self.settings.max_logprobs,
            stream_usage="stream_usage" not in self._lacking(deployment),
            max_stops=self.settings.max_stops,
            schema_support=_schemas.openai_strict_problem,
            strict_tools=True,
            reasoning=_ALL_KNOBS if self.settings.reasoning_field == "reasoning" else _EFFORT,
        )

    # -- the request --------------------------------------------------------------------------

    def _body(self, call: Call, *, stream: bool) -> bytes:
        p = call.request
        fields: dict[str, Any] = {k: v for k, v in self.settings.defaults.items() if k != "max_tokens"}
        fields["model"] = call.deployment.model
        fields["messages"] = [_message(m) for m in conversation(call)]
        if p.tools:
            fields["tools"] = [{"type": "function", "function": function_fields(t)} for t in p.tools]
            if p.tool_choice is not None:
                fields["tool_choice"] = p.tool_choice
            if p.parallel_tool_calls is not None:
                fields["parallel_tool_calls"] = p.parallel_tool_calls
        for name in _SAMPLING:
            if (value := getattr(p, name)) is not None:
                fields[name] = value
        if p.stop:
            fields["stop"] = [p.stop] if isinstance(p.stop, str) else p.stop
        cap = max_tokens_for(p.max_tokens, self.settings.defaults, None)
        if cap is not None:
            settings = self.settings
            fields[settings.max_tokens_field] = with_budget(
                cap, settings.reasoning_budget, settings.max_output_tokens
            )
        if p.logprobs is not None:
            fields["logprobs"] = True
            fields["top_logprobs"] = p.logprobs
        kind = format_kind(p.response_format)
        if kind != "text":
            wire = msgspec.to_builtins(p.response_format)
            if kind == "json_schema":  # (its unset fields left out, not sent as null)
                wire["json_schema"] = {k: v for k, v in wire["json_schema"].items() if v is not None}
            fields["response_format"] = wire
        if (r := p.reasoning) is not None:
            if self.settings.reasoning_field == "reasoning":
                fields["reasoning"] = {
                    k: v for k, v in msgspec.structs.asdict(r).items() if v is not None
                }
            elif r.effort is not None:
                fields["reasoning_effort"] = r.effort
        for name in self.settings.forward:
            if (value := getattr(p, name)) not in (UNSET, None):
                fields[name] = value
        if stream:
            fields["stream"] = True
            if not self._lacks(call.deployment, "stream_usage"):
                fields["stream_options"] = {"include_usage": True}
        return encoder.encode(fields)

    # -- the answer -----------------------------------------------------------------------------

    async def complete(self, call: Call) -> Completion:
        raw = await self.post(self._url, self._body(call, stream=False), call.timeouts, self._headers)
        body = self._decode(raw)
        k = call.request.logprobs
        choices = []
        for c in body.choices:
            message = c.message or _Message()
            refused = message.content is None and message.refusal is not None
            native = c.finish_reason
            text = (message.refusal if refused else message.content) or ""
            choices.append(
                CompletionChoice(
                    text=text,
                    index=c.index,
                    logprobs=_logprobs(LogprobsBuilder(), c.logprobs, k, text, self.name),
                    finish_reason="content_filter" if refused else normalise_finish_reason(native),  # type: ignore[arg-type]
                    native_finish_reason=native if native is not None else UNSET,
                    reasoning=message.reasoning or message.reasoning_content,
                    tool_calls=self._calls(message.tool_calls),
                    refusal=True if refused else UNSET,
                )
            )
        return Completion(choices, _usage(body.usage), body.system_fingerprint or UNSET)

    def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        k = call.request.logprobs
        builders: dict[int, LogprobsBuilder] = {}
        refused: set[int] = set()  # choices whose text is a refusal
        seen = Seen()
        body = self._body(call, stream=True)

        def read(event: _http.Event) -> StreamPart | None:
            if event.data == b"[DONE]":
                seen.done = True
                return None
            parsed = self._decode(event.data)
            out = [self._delta(c, builders, refused, k) for c in parsed.choices]
            seen.text_chunks += sum(1 for c in out if c.text)
            seen.usage = seen.usage or parsed.usage is not None
            usage = _usage(parsed.usage) if parsed.usage is not None else None
            return StreamPart(out, usage, parsed.system_fingerprint or UNSET)

        return self.parts(self._url, body, call.timeouts, self._headers, read, seen.ended, seen.rest)

    def _delta(
        self, c: _Choice, builders: dict[int, LogprobsBuilder], refused: set[int], k: int | None
    ) -> ChunkChoice:
        delta = c.delta or _Message()
        if delta.content is None and delta.refusal is not None:
            refused.add(c.index)
        text = delta.content or delta.refusal or ""
        native = c.finish_reason
        finish = None
        if native is not None:
            finish = "content_filter" if c.index in refused else normalise_finish_reason(native)
        builder = builders.setdefault(c.index, LogprobsBuilder())
        return ChunkChoice(
            text,
            c.index,
            _logprobs(builder, c.logprobs, k, text, self.name),
            finish,  # type: ignore[arg-type]
            native if native is not None else UNSET,
            delta.reasoning or delta.reasoning_content,
            [_call_delta(t) for t in delta.tool_calls] if delta.tool_calls else UNSET,
            True if c.index in refused and text else UNSET,
        )

    def _calls(self, calls: list[_ToolCall] | None) -> list[ToolCall] | UnsetType:
        if not calls:
            return UNSET
        out = []
        for t in calls:
            if t.id is None or t.function is None or not t.function.name:
                raise UpstreamUnavailable(f"Provider {self.name} sent a tool call without its name.")
            out.append(
                ToolCall(id=t.id, function=FunctionCall(t.function.name, t.function.arguments or ""))
            )
        return out

    def _decode(self, raw: bytes) -> _Body:
        body = self.decoded(_decoder, raw, "a chat completion")
        if body.error and bytes(body.error) != b"null":
            raise openai_error(self.name, self.redact, 200, {}, raw, in_band=True)
        return body

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> LlmrouterError:
        return openai_error(self.name, self.redact, status, headers, body)


def _message(m: Message) -> dict[str, Any]:
    """A turn in OpenAI's own terms (the neutral message is OpenAI's, less its wire types)."""
    # Ids without what another kind carried in them (OpenAI's are short; the same for a call
    # and its result).
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": own_id(m.tool_call_id or ""), "content": m.content}
    if m.tool_calls:
        calls = [{"id": own_id(c.id), "type": "function", "function": c.function} for c in m.tool_calls]
        turn = {"role": "assistant", "content": m.content or None, "tool_calls": calls}
        if m.name is not None:
            turn["name"] = m.name
        return turn
    said: dict[str, Any] = {"role": m.role}
    said["content"] = [_part(p) for p in m.parts] if m.parts else m.content
    if m.name is not None:
        said["name"] = m.name
    return said


def _part(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    image = {"url": part.url} if part.detail is None else {"url": part.url, "detail": part.detail}
    return {"type": "image_url", "image_url": image}


def _call_delta(t: _ToolCall) -> ToolCallDelta:
    f = t.function or _Function()
    return ToolCallDelta(
        t.index,
        t.id if t.id is not None else UNSET,
        "function" if t.id is not None else UNSET,
        FunctionDelta(f.name if f.name is not None else UNSET, f.arguments or ""),
    )


def _usage(u: _Usage | None) -> Usage:
    u = u or _Usage()
    usage = Usage(
        u.prompt_tokens, u.completion_tokens, u.total_tokens or u.prompt_tokens + u.completion_tokens
    )
    if u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens is not None:
        usage.prompt_tokens_details = PromptTokensDetails(u.prompt_tokens_details.cached_tokens)
    details = u.completion_tokens_details
    if details is not None and details.reasoning_tokens is not None:
        usage.completion_tokens_details = CompletionTokensDetails(details.reasoning_tokens)
    return usage


def _logprobs(
    builder: LogprobsBuilder, logprobs: _Logprobs | None, k: int | None, text: str, provider: str
) -> Logprobs | None:
    if k is None:
        return None
    if logprobs is None:
        if text:
            raise missing_logprobs(provider)
        return None
    tokens = logprobs.content if logprobs.content is not None else logprobs.refusal or []
    return builder.build(
        [
            (
                t.token,
                None if t.bytes is None else bytes(t.bytes),
                t.logprob,
                {top.token: top.logprob for top in t.top_logprobs[:k]} if k else None,
            )
            for t in tokens
        ]
    )
