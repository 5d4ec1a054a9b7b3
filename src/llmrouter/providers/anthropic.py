"""The `anthropic` provider: Anthropic's Messages API (`POST {base_url}/v1/messages`).

The prompt is one user message. `max_tokens` is always sent (the API requires it): the request's,
else the Completions API's 16, and for `max_tokens: null` the provider's `max_output_tokens`.
Thinking blocks come back in `choices[].reasoning`. Usage: prompt tokens are input + cache
creation + cache read; a stream's `message_delta` usage is cumulative (it replaces, never adds).
A stream is complete at `message_stop`, and an `error` event inside it is a failure.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from msgspec import UNSET, Struct

from llmrouter.errors import (
    ContextLengthExceeded,
    LlmrouterError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from llmrouter.generation import LEAST_THINKING, MOST_THINKING, Generation, Image, Message
from llmrouter.providers import _http, _schemas
from llmrouter.providers._common import (
    HttpAdapter,
    call_arguments,
    carried,
    carry,
    conversation,
    instructions_apart,
    max_tokens_for,
    own_id,
    with_budget,
)
from llmrouter.providers.base import Call, Capabilities, Completion, StreamPart
from llmrouter.settings import AnthropicProvider, CheckSettings, ConfigError, DeploymentSettings
from llmrouter.structured import format_kind
from llmrouter.wire.completions import (
    ChunkChoice,
    CompletionChoice,
    PromptTokensDetails,
    Usage,
    encoder,
)
from llmrouter.wire.tools import (
    FunctionCall,
    FunctionDefinition,
    FunctionDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    function_fields,
)

__all__ = ["AnthropicAdapter"]

# stop_reason -> finish_reason, deliberately (`native_finish_reason` keeps the raw value).
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "pause_turn": "stop",
    "tool_use": "tool_calls",
}
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]{1,256}")  # what the API takes as a tool_use id
_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}
# `reasoning.effort` as a share of the most the model writes (OpenRouter's), within
# generation.LEAST_THINKING and MOST_THINKING.
_EFFORT_SHARE = {"minimal": 0.1, "low": 0.2, "medium": 0.5, "high": 0.8}


class _Block(Struct):
    type: str
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None  # redacted_thinking
    id: str | None = None  # tool_use
    name: str | None = None
    input: msgspec.Raw = msgspec.Raw()  # (its JSON as sent: a call's arguments)


class _Usage(Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Error(Struct):
    type: str = ""
    message: str = ""


class _Message(Struct):
    type: str = "message"
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: _Usage | None = None
    error: _Error | None = None  # a 200 whose body is an error


class _Delta(Struct):
    type: str | None = None
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Event(Struct):
    type: str
    message: _Message | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None
    error: _Error | None = None
    index: int = 0
    content_block: _Block | None = None


class _ErrorBody(Struct):
    error: _Error | None = None


class _Stream:
    """What a stream has said so far: its usage (totals), its stop reason, whether it ended, and
    its thinking blocks and tool calls (block index -> the call's place)."""

    __slots__ = ("argued", "calls", "native", "stopped", "thinking", "usage")

    def __init__(self) -> None:
        self.usage = _Usage()
        self.native: str | None = None
        self.stopped = False
        self.thinking: list[dict[str, Any]] = []
        self.calls: dict[int, int] = {}
        self.argued: set[int] = set()  # the calls whose input came (in input_json_delta pieces)


_message = msgspec.json.Decoder(_Message)
_event = msgspec.json.Decoder(_Event)
_error_body = msgspec.json.Decoder(_ErrorBody)


class AnthropicAdapter(HttpAdapter):
    settings: AnthropicProvider
    native = frozenset(
        {"temperature", "top_p", "stop", "stream", "max_tokens", "response_format",
         "tools", "tool_choice", "parallel_tool_calls", "reasoning"}
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        settings: AnthropicProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
        transport: _http.Transport | None = None,
    ) -> None:
        super().__init__(name, settings, deployments, checks, transport)
        budget = settings.thinking_budget
        if budget is not None and settings.max_output_tokens <= budget:
            raise ConfigError(
                f"provider {name!r}: max_output_tokens ({settings.max_output_tokens}) must be "
                f"more than thinking_budget ({budget}), which is spent out of it"
            )
        if "metadata" in settings.forward:
            raise ConfigError(f"provider {name!r}: the Messages API has no place for `metadata`")
        self._url = settings.base_url.rstrip("/") + "/v1/messages"
        credentials = {"anthropic-version": settings.anthropic_version}
        if settings.api_key:
            credentials["x-api-key"] = settings.api_key
        self._headers = self.headers(credentials)

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        return self.chat_capabilities(
            deployment,
            response_formats=self.settings.response_formats,
            schema_support=_schemas.anthropic_problem,
            max_logprobs=0,
            stop_ok=_has_text,  # (the API refuses a stop sequence of whitespace only: "\n")
            refuses=self._refuses,
            strict_tools=True,
        )

    def _refuses(self, p: Generation) -> tuple[str, str] | None:
        """What the API takes while this request thinks: temperature 1, top_p from 0.95, and no
        forced tool use."""
        if self._thinking_budget(p) is None:
            return None
        if p.temperature is not None and p.temperature != 1:
            return "temperature", "takes `temperature` 1 only while thinking"
        if p.top_p is not None and p.top_p < 0.95:
            return "top_p", "takes `top_p` from 0.95 to 1 only while thinking"
        if p.tools and p.tool_choice is not None and p.tool_choice not in ("auto", "none"):
            return "tool_choice", "cannot force a tool call while thinking"
        return None

    def _body(self, call: Call, *, stream: bool) -> bytes:
        p = call.request
        fields: dict[str, Any] = {k: v for k, v in self.settings.defaults.items() if k != "max_tokens"}
        fields["model"] = call.deployment.model
        system, turns = instructions_apart(conversation(call))
        if system is not None:
            fields["system"] = system
        fields["messages"] = _turns(turns)
        if p.tools:
            fields["tools"] = [_tool(t) for t in p.tools]
            choice: dict[str, Any] = {"type": "auto"}
            if isinstance(p.tool_choice, NamedToolChoice):
                choice = {"type": "tool", "name": p.tool_choice.function.name}
            elif p.tool_choice is not None:
                choice = {"type": _TOOL_CHOICE[p.tool_choice]}
            if p.parallel_tool_calls is False and choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
            fields["tool_choice"] = choice
        fields["max_tokens"] = max_tokens_for(
            p.max_tokens, self.settings.defaults, self.settings.max_output_tokens
        )
        if p.temperature is not None:
            fields["temperature"] = p.temperature
        if p.top_p is not None:
            fields["top_p"] = p.top_p
        if p.stop:
            fields["stop_sequences"] = [p.stop] if isinstance(p.stop, str) else p.stop
        if "user" in self.settings.forward and p.user:
            fields["metadata"] = {"user_id": p.user}
        if format_kind(p.response_format) == "json_schema":
            schema = p.response_format.json_schema.schema or {}  # type: ignore[union-attr]
            fields["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        if (budget := self._thinking_budget(p)) is not None:
            fields["thinking"] = {"type": "enabled", "budget_tokens": budget}
            # The budget is spent out of max_tokens: on top of the text's, within the most the
            # model writes (`null` asks for that most).
            if p.max_tokens is not None:
                fields["max_tokens"] = with_budget(
                    fields["max_tokens"], budget, self.settings.max_output_tokens
                )
        if stream:
            fields["stream"] = True
        return encoder.encode(fields)

    def _thinking_budget(self, p: Generation) -> int | None:
        """The thinking budget: the provider's, or what the request's `reasoning` asks (a budget,
        at least the API's 1024; an effort, as a share of the most the model writes; off)."""
        r, ceiling = p.reasoning, self.settings.max_output_tokens
        if r is None or not (r.enabled is not None or r.max_tokens is not None or r.effort):
            return self.settings.thinking_budget
        if r.enabled is False:
            return None
        if r.max_tokens is not None:
            budget = r.max_tokens
        elif r.effort is not None:
            budget = min(MOST_THINKING, int(ceiling * _EFFORT_SHARE[r.effort]))
        else:
            budget = self.settings.thinking_budget or LEAST_THINKING
        return max(LEAST_THINKING, min(budget, ceiling - 1))  # (spent out of max_tokens)

    async def complete(self, call: Call) -> Completion:
        raw = await self.post(self._url, self._body(call, stream=False), call.timeouts, self._headers)
        message = self.decoded(_message, raw, "a message")
        if message.type == "error":
            raise self._in_band(message.error or _Error())
        text = "".join(b.text or "" for b in message.content if b.type == "text")
        thinking = "".join(b.thinking or "" for b in message.content if b.type == "thinking")
        native = message.stop_reason
        kept = [_kept(b) for b in message.content if b.type in ("thinking", "redacted_thinking")]
        calls = [
            ToolCall(
                id=_carried(b.id or "", kept if k == 0 else []),
                function=FunctionCall(b.name or "", bytes(b.input).decode() or "{}"),
            )
            for k, b in enumerate(b for b in message.content if b.type == "tool_use")
        ]
        choice = CompletionChoice(
            text=text,
            index=0,
            logprobs=None,
            finish_reason=_FINISH.get(native or "", "stop"),  # type: ignore[arg-type]
            native_finish_reason=native if native is not None else UNSET,
            reasoning=thinking or None,
            tool_calls=calls or UNSET,
        )
        return Completion([choice], _usage(message.usage or _Usage()))

    def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        state = _Stream()
        body = self._body(call, stream=True)

        def read(sse: _http.Event) -> StreamPart | None:
            return self._read(sse.data, state)

        def stopped() -> bool:
            return state.stopped

        return self.parts(self._url, body, call.timeouts, self._headers, read, stopped)

    def _read(self, data: bytes, state: _Stream) -> StreamPart | None:
        """One stream event: what it adds to the answer, if anything."""
        event = self.decoded(_event, data, "a stream event")
        kind, delta = event.type, event.delta
        if kind == "content_block_delta" and delta is not None:
            if delta.type == "text_delta" and delta.text:
                return StreamPart([ChunkChoice(delta.text, 0)])
            if delta.type == "thinking_delta" and delta.thinking:
                if state.thinking:
                    state.thinking[-1]["thinking"] += delta.thinking
                return StreamPart([ChunkChoice("", 0, reasoning=delta.thinking)])
            if delta.type == "signature_delta" and delta.signature and state.thinking:
                state.thinking[-1]["signature"] = delta.signature
            if delta.type == "input_json_delta" and delta.partial_json and event.index in state.calls:
                state.argued.add(event.index)
                piece = ToolCallDelta(
                    state.calls[event.index], function=FunctionDelta(arguments=delta.partial_json)
                )
                return StreamPart([ChunkChoice("", 0, tool_calls=[piece])])
        elif kind == "content_block_start" and (block := event.content_block) is not None:
            if block.type in ("thinking", "redacted_thinking"):
                state.thinking.append(_kept(block))
            elif block.type == "tool_use":
                k = state.calls[event.index] = len(state.calls)
                carried = _carried(block.id or "", state.thinking if k == 0 else [])
                start = ToolCallDelta(k, carried, "function", FunctionDelta(block.name or "", ""))
                return StreamPart([ChunkChoice("", 0, tool_calls=[start])])
        elif kind == "content_block_stop" and event.index in state.calls:
            if event.index not in state.argued:  # a call without input: its arguments are {}
                empty = ToolCallDelta(state.calls[event.index], function=FunctionDelta(arguments="{}"))
                return StreamPart([ChunkChoice("", 0, tool_calls=[empty])])
        elif kind == "message_start" and event.message is not None:
            state.usage = _merged(state.usage, event.message.usage)
        elif kind == "message_delta":
            state.usage = _merged(state.usage, event.usage)  # totals so far: replaced, not added
            if delta is not None and delta.stop_reason is not None:
                state.native = delta.stop_reason
        elif kind == "message_stop":
            state.stopped = True
            native = state.native
            finish = _FINISH.get(native or "", "stop")
            end = ChunkChoice("", 0, None, finish, native if native is not None else UNSET)  # type: ignore[arg-type]
            return StreamPart([end], usage=_usage(state.usage))
        elif kind == "error":
            raise self._in_band(event.error or _Error())
        return None

    def _in_band(self, error: _Error) -> LlmrouterError:
        detail = self.redact(error.message)[: _http.MAX_ERROR_TEXT]
        said = f"Provider {self.name} reported an error: {detail}"
        if error.type in ("overloaded_error", "rate_limit_error"):
            return UpstreamRateLimited(said)
        return UpstreamUnavailable(said)

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> LlmrouterError:
        try:
            error = _error_body.decode(body).error or _Error()
        except (msgspec.DecodeError, RecursionError):
            error = _Error(message=body.decode("utf-8", errors="replace").strip())
        detail = self.redact(f"{error.type}: {error.message}" if error.type else error.message)
        recognised: type[LlmrouterError] | None = None
        lowered = error.message.lower()
        if status == 400 and ("prompt is too long" in lowered or "exceed context limit" in lowered):
            recognised = ContextLengthExceeded
        elif status == 529 or error.type == "overloaded_error":  # load, not sickness: skipped
            recognised = UpstreamRateLimited
        return _http.status_error(self.name, status, headers, detail, recognised=recognised)


def _turns(turns: list[Message]) -> list[dict[str, Any]]:
    """The conversation in the Messages API's terms: an assistant's calls as tool_use blocks (after
    the thinking blocks they were made with, carried in the first call's id), the results that
    answer them as tool_result blocks of one user turn."""
    out: list[dict[str, Any]] = []
    for m in turns:
        if m.role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": _api_id(m.tool_call_id or ""),
                "content": m.content,
            }
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
        elif m.tool_calls:
            _, kept = _uncarried(m.tool_calls[0].id)
            blocks: list[dict[str, Any]] = list(kept)
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            blocks.extend(
                {
                    "type": "tool_use",
                    "id": _api_id(c.id),
                    "name": c.function.name,
                    "input": call_arguments(c.function.arguments),
                }
                for c in m.tool_calls
            )
            out.append({"role": "assistant", "content": blocks})
        elif m.parts:
            out.append({"role": m.role, "content": [_block(p) for p in m.parts]})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def _block(part: str | Image) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if part.data is not None:
        source = {"type": "base64", "media_type": part.media_type, "data": part.data}
    else:
        source = {"type": "url", "url": part.url}
    return {"type": "image", "source": source}


def _tool(t: FunctionDefinition) -> dict[str, Any]:
    """A function as the API declares a tool: its schema as `input_schema` (always there)."""
    tool = function_fields(t)
    tool["input_schema"] = tool.pop("parameters", {"type": "object"})
    if not tool.pop("strict", False):
        return tool
    return {**tool, "strict": True}


def _kept(block: _Block) -> dict[str, Any]:
    """A thinking block as it must be sent back with the calls made after it."""
    if block.type == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.data or ""}
    return {"type": "thinking", "thinking": block.thinking or "", "signature": block.signature or ""}


class _Thinking(Struct, tag_field="type", tag="thinking", forbid_unknown_fields=True):
    thinking: str
    signature: str


class _Redacted(Struct, tag_field="type", tag="redacted_thinking", forbid_unknown_fields=True):
    data: str


# What a call's id may carry back: thinking blocks, exactly (anything else is not ours).
_thoughts = msgspec.json.Decoder(list[_Thinking | _Redacted])


def _carried(call_id: str, thinking: list[dict[str, Any]]) -> str:
    """The id a client sees: the API's, and the thinking blocks to send back with the call."""
    if not thinking:
        return call_id
    return carry(call_id, "a", base64.urlsafe_b64encode(encoder.encode(thinking)).decode().rstrip("="))


def _uncarried(call_id: str) -> tuple[str, list[dict[str, Any]]]:
    head, tail = carried(call_id, "a")
    if not tail:
        return head, []
    try:
        blocks = _thoughts.decode(base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4)))
    except (ValueError, msgspec.DecodeError, RecursionError):
        return head, []  # (not one of ours: the id is what it is)
    return head, [msgspec.to_builtins(b) for b in blocks]


def _api_id(call_id: str) -> str:
    """The id as the API takes it: its own, or a stable stand-in for another's (the same for a
    call and its result)."""
    head = own_id(call_id)
    if _TOOL_ID.fullmatch(head):
        return head
    return "toolu_" + hashlib.sha256(call_id.encode()).hexdigest()[:24]


def _has_text(stop: str) -> bool:
    return bool(stop.strip())


def _merged(old: _Usage, new: _Usage | None) -> _Usage:
    """Counts of `new` where it has them, else `old`'s: each event's figures are totals so far."""
    if new is None:
        return old
    return _Usage(
        *(
            n if n is not None else o
            for o, n in zip(msgspec.structs.astuple(old), msgspec.structs.astuple(new), strict=True)
        )
    )


def _usage(u: _Usage) -> Usage:
    prompt = (
        (u.input_tokens or 0) + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
    )
    completion = u.output_tokens or 0
    usage = Usage(prompt, completion, prompt + completion)
    if u.cache_read_input_tokens is not None:  # (thinking is in output_tokens, not apart)
        usage.prompt_tokens_details = PromptTokensDetails(u.cache_read_input_tokens)
    return usage
