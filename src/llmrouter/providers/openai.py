"""The `openai` provider: any OpenAI-compatible upstream, through its `/completions` endpoint.

A translation on the shared transport (`_http`): the request's fields as the upstream takes them,
its answers and stream chunks read back, its error bodies classified.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct

from llmrouter.errors import (
    ContextLengthExceeded,
    LlmrouterError,
    UpstreamRefused,
    UpstreamUnavailable,
)
from llmrouter.obs.redact import Redactor
from llmrouter.providers import _http
from llmrouter.providers._chat_template import chat_template, template_key
from llmrouter.providers._common import HttpAdapter, Seen, default_cap, missing_logprobs
from llmrouter.providers.base import (
    ALL_PARAMETERS,
    CHAT_PARAMETERS,
    Call,
    Capabilities,
    Completion,
    StreamPart,
    Tokenized,
    Tokenizer,
    normalise_finish_reason,
)
from llmrouter.settings import (
    CheckSettings,
    ConfigError,
    DeploymentSettings,
    OpenAIProvider,
)
from llmrouter.structured import format_kind, gbnf_for
from llmrouter.wire.completions import (
    ChunkChoice,
    CompletionChoice,
    Logprobs,
    Usage,
    encoder,
)
from llmrouter.wire.validate import Prompts

__all__ = ["OpenAIAdapter", "openai_error"]

# What a Generation holds that is not a /completions field, or is the router's own unless
# `forward` says.
# (A conversation is sent as its template's prompt, tools written into it.)
_NOT_SENT = (
    "prompts",
    "messages",
    "stream",
    "include_usage",
    "user",
    "metadata",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning",
)
_REFUSAL_CODES = frozenset({"content_filter", "content_policy_violation"})


# What we read back. Lenient on purpose: upstreams add fields, and some omit ones they should send.
# (Decoded for every part of a stream, never in a cycle: not tracked by the cyclic GC.)
class _Choice(Struct, gc=False):
    text: str = ""
    index: int = 0
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class _Usage(Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _ErrorDetail(Struct):
    message: str = ""
    code: str | int | None = None


class _Body(Struct, gc=False):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    system_fingerprint: str | None = None
    error: _ErrorDetail | str | None = None


_body_decoder = msgspec.json.Decoder(_Body)


class OpenAIAdapter(HttpAdapter):
    settings: OpenAIProvider
    native = ALL_PARAMETERS - CHAT_PARAMETERS

    def __init__(
        self,
        name: str,
        settings: OpenAIProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
        transport: _http.Transport | None = None,
    ) -> None:
        super().__init__(name, settings, deployments, checks, transport)
        # A chat request's conversation becomes a prompt through the deployment's template (its
        # config's): the upstream reads it as it reads any prompt.
        self._templates = {template_key(d): chat_template(d) for d in deployments}
        self._url = settings.base_url.rstrip("/") + "/completions"
        self._headers = self.headers(
            {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else None
        )
        if settings.structured_output_field == "grammar" and "json_schema" in settings.response_formats:
            try:  # JSON Schema becomes GBNF with llama-cpp-python's converter
                import llama_cpp.llama_grammar  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"provider {name!r}: json_schema as a GBNF grammar needs llama-cpp-python "
                    "(pip install 'llmrouter[local]')"
                ) from None

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        unsupported = self._lacking(deployment)
        return Capabilities(
            parameters=self.parameters(deployment),
            ranges=self.ranges(deployment),
            response_formats=self.settings.response_formats,
            max_logprobs=self.settings.max_logprobs,
            token_prompts="prompt_token_ids" not in unsupported,
            prompt_batch="prompt_batch" not in unsupported,
            max_tokens_zero="max_tokens_zero" not in unsupported,
            best_of_above_n="best_of" not in unsupported,
            stream_usage="stream_usage" not in unsupported,
            default_max_tokens=default_cap(self.settings.defaults),
            chat_template=self._templates.get(template_key(deployment)),
        )

    def tokenizer(self, deployment: DeploymentSettings) -> Tokenizer | None:
        if self.settings.tokenizer is None:
            return None
        return _UpstreamTokenizer(self, deployment.model)

    # -- requests -----------------------------------------------------------------------------

    def _body(self, call: Call, *, stream: bool) -> bytes:
        fields: dict[str, Any] = {**self.settings.defaults, **msgspec.to_builtins(call.request)}
        for name in _NOT_SENT:
            fields.pop(name, None)
        if call.request.messages:  # (sent only where there is a template)
            template = self._templates[template_key(call.deployment)]
            assert template is not None
            p = call.request
            fields["prompt"] = template.render(p.messages, p.tools if p.tool_choice != "none" else ())
        else:
            fields["prompt"] = _wire_prompt(call.request.prompts)
        response_format = call.request.response_format
        if format_kind(response_format) == "text":
            fields.pop("response_format", None)  # the default: legacy upstreams do not know it
        elif self.settings.structured_output_field == "grammar":
            fields.pop("response_format")
            fields["grammar"] = gbnf_for(response_format, self.checks)
        for name in self.settings.forward:
            value = getattr(call.request, name)
            if value is not UNSET and value is not None:
                fields[name] = value
        fields["model"] = call.deployment.model
        if stream:
            fields["stream"] = True
            if not self._lacks(call.deployment, "stream_usage"):
                fields["stream_options"] = {"include_usage": True}
        return encoder.encode(fields)

    async def _encoded(self, call: Call, *, stream: bool) -> bytes:
        kind = format_kind(call.request.response_format)
        if kind == "json_schema" and self.settings.structured_output_field == "grammar":
            # A schema becomes GBNF by llama-cpp-python's converter, and the result is checked:
            # time that grows with the schema (cached after), so not on the event loop.
            return await asyncio.to_thread(self._body, call, stream=stream)
        return self._body(call, stream=stream)

    async def complete(self, call: Call) -> Completion:
        body = await self._encoded(call, stream=False)
        parsed = self._decode(await self.post(self._url, body, call.timeouts, self._headers))
        self._check_logprobs(call, parsed)
        choices = [
            CompletionChoice(
                text=c.text,
                index=c.index,
                logprobs=c.logprobs,
                finish_reason=normalise_finish_reason(c.finish_reason),  # type: ignore[arg-type]
                native_finish_reason=c.finish_reason if c.finish_reason is not None else UNSET,
                reasoning=c.reasoning or c.reasoning_content,
            )
            for c in parsed.choices
        ]
        u = parsed.usage or _Usage()
        return Completion(
            choices=choices,
            usage=Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens),
            system_fingerprint=parsed.system_fingerprint or UNSET,
        )

    def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        seen = Seen()
        logprobs = call.request.logprobs is not None

        def read(event: _http.Event) -> StreamPart | None:
            if event.data == b"[DONE]":
                seen.done = True
                return None
            return self._part(self._decode(event.data), logprobs, seen)

        body = functools.partial(self._encoded, call, stream=True)
        return self.parts(self._url, body, call.timeouts, self._headers, read, seen.ended, seen.rest)

    async def fetch(self, method: str, path: str, fields: dict[str, Any] | None) -> Any:
        """One whole JSON exchange with the upstream's tokenizer endpoints (`path` under
        `tokenizer_url`); its errors translated as a completion's are."""
        base = self.settings.tokenizer_url or _server_root(self.settings.base_url)
        body = None if fields is None else encoder.encode(fields)
        request = _http.Request(method, base.rstrip("/") + path, body, self._headers)
        response = await self.transport.send(request, self.timeouts)
        raw = await _http.read_whole(response, self._error)
        try:
            return msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            raise UpstreamUnavailable(
                f"Provider {self.name} sent a {path} answer that is not JSON llmrouter reads."
            ) from None

    def _check_logprobs(self, call: Call, parsed: _Body) -> None:
        """Logprobs asked for come with every choice's text, or the answer is a failure."""
        if call.request.logprobs is not None and any(
            c.text and c.logprobs is None for c in parsed.choices
        ):
            raise missing_logprobs(self.name)

    def _part(self, parsed: _Body, logprobs: bool, seen: Seen) -> StreamPart:
        """A chunk's part, counted in `seen`. With `logprobs` asked for, a choice's text comes
        with its logprobs, or the answer is a failure. (Made for every chunk of every stream:
        one pass, the usual choice made with the fewest arguments.)"""
        choices: list[ChunkChoice] = []
        for c in parsed.choices:
            text = c.text
            if text:
                seen.text_chunks += 1
                if logprobs and c.logprobs is None:
                    raise missing_logprobs(self.name)
            reasoning = c.reasoning or c.reasoning_content
            finish = c.finish_reason
            if finish is not None:
                normal = normalise_finish_reason(finish)
                choices.append(ChunkChoice(text, c.index, c.logprobs, normal, finish, reasoning))  # type: ignore[arg-type]
            elif reasoning is not None:
                choices.append(ChunkChoice(text, c.index, c.logprobs, None, UNSET, reasoning))
            else:
                choices.append(ChunkChoice(text, c.index, c.logprobs))
        u = parsed.usage
        if u is None:
            return StreamPart(choices, None, parsed.system_fingerprint or UNSET)
        seen.usage = True
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)
        return StreamPart(choices, usage, parsed.system_fingerprint or UNSET)

    # -- translating failures -----------------------------------------------------------------

    def _decode(self, raw: bytes) -> _Body:
        parsed = self.decoded(_body_decoder, raw, "a completion")
        if parsed.error is not None:
            raise openai_error(self.name, self.redact, 200, {}, raw, in_band=True)
        return parsed

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> LlmrouterError:
        return openai_error(self.name, self.redact, status, headers, body)


def openai_error(
    provider: str,
    redact: Redactor,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    in_band: bool = False,
) -> LlmrouterError:
    """An OpenAI-shaped error body (`{"error": {"message", "code"}}`), as the error tree has it;
    `in_band`: one sent inside a 200 answer or stream."""
    detail, code = _error_detail(body)
    detail = redact(detail)
    if in_band:
        return UpstreamUnavailable(
            f"Provider {provider} reported an error: {detail[: _http.MAX_ERROR_TEXT]}"
        )
    recognised: type[LlmrouterError] | None = None
    if status in (400, 413, 422):
        lowered = detail.lower()
        if code == "context_length_exceeded" or "maximum context length" in lowered:
            recognised = ContextLengthExceeded
        elif code in _REFUSAL_CODES or "content management policy" in lowered:
            recognised = UpstreamRefused
    return _http.status_error(provider, status, headers, detail, recognised=recognised)


class _UpstreamTokenizer:
    """An upstream's tokenizer endpoints, vLLM's or llama.cpp's server's, in vLLM's terms."""

    def __init__(self, adapter: OpenAIAdapter, model: str) -> None:
        self._adapter = adapter
        self._model = model
        self._kind = adapter.settings.tokenizer
        self.has_info = self._kind == "vllm"

    async def tokenize(self, text: str, *, add_special: bool, strings: bool) -> Tokenized:
        if self._kind == "vllm":
            fields = {"model": self._model, "prompt": text, "add_special_tokens": add_special}
            if strings:
                fields["return_token_strs"] = True
            answer = _convert(await self._adapter.fetch("POST", "/tokenize", fields), _VllmTokens)
            if answer.token_strs is not None and len(answer.token_strs) != len(answer.tokens):
                raise UpstreamUnavailable(
                    f"Provider {self._adapter.name} sent {len(answer.token_strs)} token strings "
                    f"for {len(answer.tokens)} tokens."
                )
            return Tokenized(answer.tokens, answer.token_strs, answer.max_model_len)
        fields = {"content": text, "add_special": add_special, "parse_special": True}
        if strings:
            fields["with_pieces"] = True
        raw = await self._adapter.fetch("POST", "/tokenize", fields)
        if strings:
            pieces = _convert(raw, _LlamaPieces).tokens
            return Tokenized([p.id for p in pieces], [_piece_text(p.piece) for p in pieces])
        return Tokenized(_convert(raw, _LlamaTokens).tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        if self._kind == "vllm":
            fields: dict[str, Any] = {"model": self._model, "tokens": tokens}
            return _convert(await self._adapter.fetch("POST", "/detokenize", fields), _VllmText).prompt
        raw = await self._adapter.fetch("POST", "/detokenize", {"tokens": tokens})
        return _convert(raw, _LlamaText).content

    async def info(self) -> dict[str, Any]:
        assert self.has_info, "llama.cpp's server has no /tokenizer_info"
        answer = await self._adapter.fetch("GET", "/tokenizer_info", None)
        if not isinstance(answer, dict):
            raise UpstreamUnavailable(f"Provider {self._adapter.name} sent a malformed /tokenizer_info.")
        return answer


# The tokenizer endpoints' answers: extra fields are ignored, but what is passed on must be a
# token id (a llama.cpp token is an int32) and a context length.
_Id = Annotated[int, Meta(ge=0, lt=2**31)]


class _VllmTokens(Struct):
    tokens: list[_Id]
    token_strs: list[str] | None = None
    max_model_len: Annotated[int, Meta(ge=1, lt=2**31)] | None = None


class _VllmText(Struct):
    prompt: str


class _LlamaTokens(Struct):
    tokens: list[_Id]


class _LlamaPiece(Struct):
    id: _Id
    piece: str | list[Annotated[int, Meta(ge=0, le=255)]]  # bytes, where not UTF-8 alone


class _LlamaPieces(Struct):
    tokens: list[_LlamaPiece]


class _LlamaText(Struct):
    content: str


T = TypeVar("T")


def _convert(raw: Any, kind: type[T]) -> T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise UpstreamUnavailable(f"A tokenizer endpoint sent a malformed answer: {exc}") from None


def _piece_text(piece: str | list[int]) -> str:
    return piece if isinstance(piece, str) else bytes(piece).decode("utf-8", errors="replace")


def _server_root(base_url: str) -> str:
    """vLLM and llama.cpp's server serve their tokenizer beside `/v1`, not under it."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _wire_prompt(prompts: Prompts) -> str | list[Any]:
    """The prompt of one call as the upstream takes it: one prompt alone, several as a list."""
    if len(prompts) == 1:
        only = prompts[0]
        return only if isinstance(only, str) else list(only)
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _error_detail(raw: bytes) -> tuple[str, str | None]:
    """The upstream error's message and code, as far as the body says."""
    try:
        parsed = _body_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return raw.decode("utf-8", errors="replace").strip(), None
    if isinstance(parsed.error, str):
        return parsed.error, None
    if parsed.error is not None:
        code = parsed.error.code
        return parsed.error.message, None if code is None else str(code)
    return "", None
