"""The `gemini` provider: Google's Gemini API, `models/{model}:generateContent` and
`:streamGenerateContent?alt=sse`, the key in the `x-goog-api-key` header (never in the URL).

The prompt is one user turn. Thought parts come back in `choices[].reasoning`; completion tokens
include the thoughts, and a stream's usage is a running total (it replaces, never adds). A prompt
blocked by `promptFeedback.blockReason` is a refusal (another deployment may answer), a candidate
ended for safety is `finish_reason: content_filter`. A stream is complete when every candidate
has its finish reason; `RESOURCE_EXHAUSTED` with `RetryInfo.retryDelay` is a Retry-After.
"""

from __future__ import annotations

import mimetypes
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

from llmrouter.errors import (
    ContextLengthExceeded,
    LlmrouterError,
    UpstreamAuthFailed,
    UpstreamRefused,
    UpstreamUnavailable,
)
from llmrouter.generation import Generation, Image, Message
from llmrouter.providers import _http, _schemas
from llmrouter.providers._common import (
    HttpAdapter,
    LogprobsBuilder,
    call_arguments,
    carried,
    carry,
    conversation,
    instructions_apart,
    max_tokens_for,
    missing_logprobs,
    with_budget,
)
from llmrouter.providers.base import Call, Capabilities, Completion, StreamPart
from llmrouter.settings import CheckSettings, ConfigError, DeploymentSettings, GeminiProvider
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
from llmrouter.wire.tools import (
    FunctionCall,
    FunctionDefinition,
    FunctionDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    function_fields,
)

__all__ = ["GeminiAdapter"]

_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}  # the safety family and the rest: below
_FILTERED = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE"}
)
_BAD_KEY = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})
# The request fields in generationConfig, by their Completions names.
_CONFIG = {
    "temperature": "temperature",
    "top_p": "topP",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "n": "candidateCount",
}


class _FunctionCall(Struct):
    name: str = ""
    args: msgspec.Raw = msgspec.Raw()  # (its JSON as sent: the call's arguments)


class _Part(Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None
    thought_signature: str | None = None


class _Content(Struct):
    parts: list[_Part] = []


class _Choice(Struct, rename="camel"):
    token: str = ""
    log_probability: float = 0.0


class _Top(Struct):
    candidates: list[_Choice] = []


class _LogprobsResult(Struct, rename="camel"):
    top_candidates: list[_Top] = []
    chosen_candidates: list[_Choice] = []


class _Candidate(Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    index: int = 0
    logprobs_result: _LogprobsResult | None = None


class _UsageMetadata(Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int | None = None  # (absent: no thinking)
    cached_content_token_count: int | None = None


class _Feedback(Struct, rename="camel"):
    block_reason: str | None = None


class _Response(Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _Feedback | None = None
    error: msgspec.Raw = msgspec.Raw()  # (not decoded here: it may be anything)


class _Detail(Struct, rename={"retry_delay": "retryDelay"}):
    retry_delay: str | None = None  # RetryInfo
    reason: str | None = None  # ErrorInfo


class _Error(Struct):
    message: str = ""
    status: str = ""
    details: list[_Detail] = []


class _ErrorBody(Struct):
    error: _Error | None = None


_response = msgspec.json.Decoder(_Response)
_error_body = msgspec.json.Decoder(_ErrorBody)


class GeminiAdapter(HttpAdapter):
    settings: GeminiProvider
    native = frozenset(
        {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "n", "stop",
         "stream", "max_tokens", "logprobs", "response_format", "tools", "tool_choice",
         "reasoning"}
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        settings: GeminiProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
        transport: _http.Transport | None = None,
    ) -> None:
        super().__init__(name, settings, deployments, checks, transport)
        if settings.forward:
            raise ConfigError(f"provider {name!r}: the Gemini API has no place for `user` or `metadata`")
        self._base = f"{settings.base_url.rstrip('/')}/{settings.api_version}/models/"
        self._headers = self.headers({"x-goog-api-key": settings.api_key} if settings.api_key else None)

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        return self.chat_capabilities(
            deployment,
            response_formats=self.settings.response_formats,
            max_logprobs=self.settings.max_logprobs,
            max_stops=5,
            schema_support=_schemas.gemini_problem,
        )

    def _body(self, call: Call) -> bytes:
        p = call.request
        config: dict[str, Any] = {k: v for k, v in self.settings.defaults.items() if k != "max_tokens"}
        for name, wire in _CONFIG.items():
            if (value := getattr(p, name)) is not None:
                config[wire] = value
        if p.stop:
            config["stopSequences"] = [p.stop] if isinstance(p.stop, str) else p.stop
        budget, level, shown = self._thinking(p)
        if (cap := max_tokens_for(p.max_tokens, self.settings.defaults, None)) is not None:
            # Thoughts count against maxOutputTokens: a budget for them comes on top of the text's.
            extra = budget if budget and budget > 0 else 0
            config["maxOutputTokens"] = with_budget(cap, extra, self.settings.max_output_tokens)
        if p.logprobs is not None:
            config["responseLogprobs"] = True
            if p.logprobs:
                config["logprobs"] = p.logprobs
        kind = format_kind(p.response_format)
        if kind in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        if kind == "json_schema":
            config["responseJsonSchema"] = p.response_format.json_schema.schema or {}  # type: ignore[union-attr]
        if budget is not None or level is not None or shown:
            thinking: dict[str, Any] = {"includeThoughts": shown}
            if budget is not None:
                thinking["thinkingBudget"] = budget
            if level is not None:
                thinking["thinkingLevel"] = level
            config["thinkingConfig"] = thinking
        system, turns = instructions_apart(conversation(call))
        fields: dict[str, Any] = {"contents": _contents(turns)}
        if system is not None:
            fields["systemInstruction"] = {"parts": [{"text": system}]}
        if p.tools:
            fields["tools"] = [{"functionDeclarations": [_declaration(t) for t in p.tools]}]
            if p.tool_choice is not None:
                fields["toolConfig"] = {"functionCallingConfig": _calling(p.tool_choice)}
        return encoder.encode({**fields, "generationConfig": config})

    def _thinking(self, p: Generation) -> tuple[int | None, str | None, bool]:
        """The thinking budget, level and whether thoughts come back: the provider's, or what the
        request's `reasoning` asks (a budget as thinkingBudget, an effort as thinkingLevel, off as
        a budget of 0; asked for, the thoughts come back unless excluded)."""
        budget, shown = self.settings.thinking_budget, self.settings.include_thoughts
        r = p.reasoning
        if r is None or not (r.enabled is not None or r.max_tokens is not None or r.effort):
            return budget, None, shown
        if r.enabled is False:
            return 0, None, False
        level = None
        if r.max_tokens is not None:
            budget = r.max_tokens
        elif r.effort is not None:
            budget, level = None, r.effort
        return budget, level, not r.exclude

    def _url(self, call: Call, method: str) -> str:
        model = call.deployment.model.removeprefix("models/")  # (the API's own name for it)
        return self._base + model + method

    async def complete(self, call: Call) -> Completion:
        url = self._url(call, ":generateContent")
        response = self._decode(await self.post(url, self._body(call), call.timeouts, self._headers))
        k = call.request.logprobs
        chunks = [_chunk(c, LogprobsBuilder(), k, self.name, {}) for c in response.candidates]
        choices = [
            CompletionChoice(
                c.text,
                c.index,
                c.logprobs,
                c.finish_reason or ("tool_calls" if c.tool_calls else "stop"),
                c.native_finish_reason,
                c.reasoning,
                _whole_calls(c.tool_calls),
            )
            for c in chunks
        ]  # (a whole answer is its one chunk; one without a finish reason stopped)
        return Completion(choices, _usage(response.usage_metadata))

    def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        url = self._url(call, ":streamGenerateContent?alt=sse")
        k = call.request.logprobs
        expected = call.request.n or 1
        builders: dict[int, LogprobsBuilder] = {}
        called: dict[int, int] = {}  # candidate -> the calls it made so far
        finished: set[int] = set()
        usage: _UsageMetadata | None = None

        def read(event: _http.Event) -> StreamPart:
            nonlocal usage
            response = self._decode(event.data)
            usage = response.usage_metadata or usage  # a running total: the last one counts
            out = []
            for c in response.candidates:
                if c.finish_reason is not None:
                    finished.add(c.index)
                builder = builders.setdefault(c.index, LogprobsBuilder())
                out.append(_chunk(c, builder, k, self.name, called))
            return StreamPart(out, _usage(usage) if done() else None)

        def done() -> bool:
            return len(finished) >= expected

        return self.parts(url, self._body(call), call.timeouts, self._headers, read, done)

    def _decode(self, raw: bytes) -> _Response:
        response = self.decoded(_response, raw, "an answer")
        if response.error and bytes(response.error) != b"null":
            raise self.error(500, {}, raw, in_band=True)
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason and not response.candidates:
            raise UpstreamRefused(
                f"Provider {self.name} blocked the prompt: {self.redact(feedback.block_reason)[:64]}."
            )
        return response

    def error(
        self, status: int, headers: Mapping[str, str], body: bytes, *, in_band: bool = False
    ) -> LlmrouterError:
        try:
            error = _error_body.decode(body).error or _Error()
        except (msgspec.DecodeError, RecursionError):
            error = _Error(message=body.decode("utf-8", errors="replace").strip())
        detail = self.redact(f"{error.status}: {error.message}" if error.status else error.message)
        if in_band:
            return UpstreamUnavailable(f"Provider {self.name} reported an error: {detail[:500]}")
        delay = next((_seconds(d.retry_delay) for d in error.details if d.retry_delay), None)
        recognised: type[LlmrouterError] | None = None
        if status == 400 and "exceeds the maximum number of tokens" in error.message:
            recognised = ContextLengthExceeded
        elif any(d.reason in _BAD_KEY for d in error.details):  # a 400, for our key: not the client's
            recognised = UpstreamAuthFailed
        return _http.status_error(
            self.name, status, headers, detail, recognised=recognised, retry_after=delay
        )


def _chunk(
    c: _Candidate, builder: LogprobsBuilder, k: int | None, provider: str, called: dict[int, int]
) -> ChunkChoice:
    """A candidate's piece; `called` counts each candidate's calls so far (across a stream's
    chunks), so that a call's index is its place in the whole message."""
    text, thought = _texts(c)
    native = c.finish_reason
    calls = []
    for part in c.content.parts if c.content is not None else []:
        if part.function_call is not None:
            at = called[c.index] = called.get(c.index, 0) + 1
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            if part.thought_signature:  # the API wants it back with the call: carried in the id
                call_id = carry(call_id, "g", part.thought_signature)
            arguments = bytes(part.function_call.args).decode() or "{}"
            function = FunctionDelta(part.function_call.name, arguments)
            calls.append(ToolCallDelta(at - 1, call_id, "function", function))
    finish = _finish(native) if native is not None else None
    if finish == "stop" and called.get(c.index):
        finish = "tool_calls"  # (Gemini says STOP)
    return ChunkChoice(
        text,
        c.index,
        _logprobs(builder, c, k, provider),
        finish,  # type: ignore[arg-type]
        native if native is not None else UNSET,
        thought or None,
        calls or UNSET,
    )


def _whole_calls(deltas: list[ToolCallDelta] | UnsetType) -> list[ToolCall] | UnsetType:
    """A whole answer's calls (each came whole, as one delta)."""
    if not deltas:
        return UNSET
    return [
        ToolCall(id=str(d.id), function=FunctionCall(str(d.function.name), d.function.arguments))  # type: ignore[union-attr]
        for d in deltas
    ]


def _contents(turns: list[Message]) -> list[dict[str, Any]]:
    """The turns in Gemini's terms: the assistant's are `model`, its calls functionCall parts
    (with the thought signature they came with), the results one user turn of functionResponse
    parts (named: Gemini pairs a result with its call by the function's name)."""
    out: list[dict[str, Any]] = []
    for m in turns:
        if m.role == "tool":
            response = {"name": m.name or "", "response": _response_object(m.content)}
            part = {"functionResponse": response}
            if out and out[-1]["role"] == "user" and "functionResponse" in out[-1]["parts"][0]:
                out[-1]["parts"].append(part)
            else:
                out.append({"role": "user", "parts": [part]})
            continue
        if m.parts:
            out.append({"role": "user", "parts": [_part(p) for p in m.parts]})
            continue
        parts: list[dict[str, Any]] = [{"text": m.content}] if m.content or not m.tool_calls else []
        for c in m.tool_calls:
            call: dict[str, Any] = {
                "functionCall": {"name": c.function.name, "args": call_arguments(c.function.arguments)}
            }
            _, signature = carried(c.id, "g")
            if signature:
                call["thoughtSignature"] = signature
            parts.append(call)
        out.append({"role": "model" if m.role == "assistant" else "user", "parts": parts})
    return out


def _part(part: str | Image) -> dict[str, Any]:
    """A message's text or image: inline data for a data: URL, else the URL as file data (its
    type guessed from its name)."""
    if isinstance(part, str):
        return {"text": part}
    if part.data is not None:
        return {"inlineData": {"mimeType": part.media_type, "data": part.data}}
    guessed = mimetypes.guess_type(part.url.split("?", 1)[0])[0] or "image/jpeg"
    return {"fileData": {"mimeType": guessed, "fileUri": part.url}}


def _response_object(content: str) -> dict[str, Any]:
    """A tool's result as the object functionResponse takes: a JSON object as it is, else
    `{"result": ...}`."""
    try:
        value = msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError):
        return {"result": content}
    return value if isinstance(value, dict) else {"result": value}


def _declaration(t: FunctionDefinition) -> dict[str, Any]:
    """A function as Gemini declares it: its schema as JSON Schema (`strict` has no place: a
    strict function never comes here, see Capabilities.strict_tools)."""
    declaration = function_fields(t)
    declaration.pop("strict", None)
    if "parameters" in declaration:
        declaration["parametersJsonSchema"] = declaration.pop("parameters")
    return declaration


def _calling(choice: ToolChoice) -> dict[str, Any]:
    if isinstance(choice, NamedToolChoice):
        return {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}
    return {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}[choice]}


def _texts(candidate: _Candidate) -> tuple[str, str]:
    parts = candidate.content.parts if candidate.content is not None else []
    text = "".join(p.text or "" for p in parts if not p.thought)
    return text, "".join(p.text or "" for p in parts if p.thought)


def _finish(native: str | None) -> str:
    if native in _FILTERED:
        return "content_filter"
    return _FINISH.get(native or "", "stop")


def _usage(u: _UsageMetadata | None) -> Usage:
    u = u or _UsageMetadata()
    completion = u.candidates_token_count + (u.thoughts_token_count or 0)
    usage = Usage(u.prompt_token_count, completion, u.prompt_token_count + completion)
    if u.cached_content_token_count is not None:
        usage.prompt_tokens_details = PromptTokensDetails(u.cached_content_token_count)
    if u.thoughts_token_count is not None:
        usage.completion_tokens_details = CompletionTokensDetails(u.thoughts_token_count)
    return usage


def _logprobs(
    builder: LogprobsBuilder, candidate: _Candidate, k: int | None, provider: str
) -> Logprobs | None:
    result = candidate.logprobs_result
    if k is None:
        return None
    if result is None:
        if _texts(candidate)[0]:
            raise missing_logprobs(provider)
        return None
    tops = result.top_candidates
    entries = []
    for i, chosen in enumerate(result.chosen_candidates):
        top = None
        if k and i < len(tops):
            top = {c.token: c.log_probability for c in tops[i].candidates[:k]}
        entries.append((chosen.token, None, chosen.log_probability, top))
    return builder.build(entries)


def _seconds(delay: str | None) -> float | None:
    """A protobuf Duration in JSON ("7s", "1.5s") as seconds."""
    if not delay or not delay.endswith("s"):
        return None
    try:
        return float(delay[:-1])
    except ValueError:
        return None
