"""The `openai` provider: any OpenAI-compatible upstream, through its `/completions` endpoint.

One pooled aiohttp session per provider keeps connections alive across requests. aiohttp's
exceptions and the upstream's error statuses are translated into `llmrouter.errors` here and
nowhere else.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

import aiohttp
import msgspec
from msgspec import UNSET, Meta, Struct

from llmrouter.errors import (
    ContextLengthExceeded,
    LlmrouterError,
    ProviderError,
    UpstreamAuthFailed,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llmrouter.obs.redact import Redactor
from llmrouter.providers.base import (
    ALL_PARAMETERS,
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
    Timeouts,
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

__all__ = ["OpenAIAdapter", "parse_retry_after"]

_ROUTER_FIELDS = ("model", "models", "provider", "user", "metadata", "stream_options")
_MAX_ERROR_TEXT = 500
_MAX_SSE_LINE = 64 * 1024 * 1024
_MAX_RETRY_AFTER = 3600.0
_REFUSAL_CODES = frozenset({"content_filter", "content_policy_violation"})


# What we read back. Lenient on purpose: upstreams add fields, and some omit ones they should send.
class _Choice(Struct):
    text: str = ""
    index: int = 0
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class _Usage(Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _ErrorDetail(Struct):
    message: str = ""
    code: str | int | None = None


class _Body(Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    system_fingerprint: str | None = None
    error: _ErrorDetail | str | None = None


_body_decoder = msgspec.json.Decoder(_Body)


class OpenAIAdapter:
    def __init__(
        self,
        name: str,
        settings: OpenAIProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
    ) -> None:
        self.name = name
        self._settings = settings
        self._checks = checks  # the limits a grammar made from a schema is held to
        self.timeouts = settings.timeouts
        self._url = settings.base_url.rstrip("/") + "/completions"
        self._headers = {"content-type": "application/json", **settings.headers}
        if settings.api_key:
            self._headers["authorization"] = f"Bearer {settings.api_key}"
        # What this provider sends that must never come back out in what it (or a proxy) says.
        self._redact = Redactor([settings.api_key, *settings.headers.values()])
        self._session: aiohttp.ClientSession | None = None
        self._stream_usage = "stream_usage" not in settings.unsupported_parameters
        if settings.structured_output_field == "grammar" and "json_schema" in settings.response_formats:
            try:  # JSON Schema becomes GBNF with llama-cpp-python's converter
                import llama_cpp.llama_grammar  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"provider {name!r}: json_schema as a GBNF grammar needs llama-cpp-python "
                    "(pip install 'llmrouter[local]')"
                ) from None

    async def start(self) -> None:
        t = self._settings.timeouts
        connector = aiohttp.TCPConnector(
            limit=self._settings.max_connections, keepalive_timeout=60, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        unsupported = self._settings.unsupported_parameters
        return Capabilities(
            parameters=ALL_PARAMETERS - unsupported,
            response_formats=self._settings.response_formats,
            max_logprobs=self._settings.max_logprobs,
            token_prompts="prompt_token_ids" not in unsupported,
            prompt_batch="prompt_batch" not in unsupported,
            max_tokens_zero="max_tokens_zero" not in unsupported,
            best_of_above_n="best_of" not in unsupported,
            stream_usage="stream_usage" not in unsupported,
            default_max_tokens=_default_max_tokens(self._settings.defaults),
        )

    def usable(self, deployment: DeploymentSettings) -> bool:
        return self._session is not None

    def ready(self, deployment: DeploymentSettings) -> bool:
        return self.usable(deployment)

    def context_length(self, deployment: DeploymentSettings) -> int | None:
        return None

    def tokenizer(self, deployment: DeploymentSettings) -> Tokenizer | None:
        if self._settings.tokenizer is None:
            return None
        return _UpstreamTokenizer(self, deployment.model)

    # -- requests -----------------------------------------------------------------------------

    def _body(self, call: Call, *, stream: bool) -> bytes:
        fields: dict[str, Any] = {**self._settings.defaults, **msgspec.to_builtins(call.params)}
        for name in _ROUTER_FIELDS:
            fields.pop(name, None)
        fields["prompt"] = _wire_prompt(call.prompts)
        response_format = call.params.response_format
        if format_kind(response_format) == "text":
            fields.pop("response_format", None)  # the default: legacy upstreams do not know it
        elif self._settings.structured_output_field == "grammar":
            fields.pop("response_format")
            fields["grammar"] = gbnf_for(response_format, self._checks)
        for name in self._settings.forward:
            value = getattr(call.params, name)
            if value is not UNSET and value is not None:
                fields[name] = value
        fields["model"] = call.deployment.model
        if stream:
            fields["stream"] = True
            if self._stream_usage:
                fields["stream_options"] = {"include_usage": True}
        return encoder.encode(fields)

    async def _encoded(self, call: Call, *, stream: bool) -> bytes:
        kind = format_kind(call.params.response_format)
        if kind == "json_schema" and self._settings.structured_output_field == "grammar":
            # A schema becomes GBNF by llama-cpp-python's converter, and the result is checked:
            # time that grows with the schema (cached after), so not on the event loop.
            return await asyncio.to_thread(self._body, call, stream=stream)
        return self._body(call, stream=stream)

    async def complete(self, call: Call) -> Completion:
        assert self._session is not None, "start() opens the session"
        body = await self._encoded(call, stream=False)
        raw = await self._whole(await self._post(body, call.timeouts))
        parsed = self._decode(raw)
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

    async def stream(self, call: Call) -> AsyncIterator[StreamPart]:
        assert self._session is not None, "start() opens the session"
        t = call.timeouts
        body = await self._encoded(call, stream=True)
        resp = await self._post(body, t)
        try:
            if resp.status != 200:
                raise self._status_error(resp, await self._read_safely(resp))
            usage_seen = False
            text_chunks = 0
            async for data in self._events(resp, first=t.first_token, idle=t.idle):
                part = self._part(self._decode(data))
                usage_seen = usage_seen or part.usage is not None
                text_chunks += sum(1 for c in part.choices if c.text)
                yield part
            if not usage_seen:
                # Some upstreams (llama.cpp's server among them) ignore stream_options and send
                # no usage. They send one token a chunk, so the chunks are the completion count;
                # the prompt's count is not known. The part says it is an estimate.
                yield StreamPart([], usage=Usage(0, text_chunks, text_chunks), usage_estimated=True)
        finally:
            resp.release()

    async def _post(
        self, body: bytes, timeouts: Timeouts, url: str | None = None
    ) -> aiohttp.ClientResponse:
        """POST a request (to /completions, or `url`) and wait for the response's headers, for at
        most `first_token`, streamed or not. Redirects are not followed: a 3xx would send the
        prompt wherever it points, so it is a failure of this deployment (`_status_error`)."""
        return await self._send("POST", url or self._url, body, timeouts)

    async def _send(
        self, method: str, url: str, body: bytes | None, timeouts: Timeouts
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "start() opens the session"
        try:
            async with asyncio.timeout(timeouts.first_token):
                return await self._session.request(
                    method, url, data=body, headers=self._headers, allow_redirects=False
                )
        except Exception as exc:
            raise self._transport_error(exc) from None

    async def _whole(self, resp: aiohttp.ClientResponse) -> bytes:
        """A response's whole body (within the session's `total`), an error status or a
        transport failure translated."""
        try:
            raw = await resp.read()
            if resp.status != 200:
                raise self._status_error(resp, raw)
            return raw
        except LlmrouterError:
            raise
        except Exception as exc:
            raise self._transport_error(exc) from None
        finally:
            resp.release()

    async def fetch(self, method: str, path: str, fields: dict[str, Any] | None) -> Any:
        """One whole JSON exchange with the upstream's tokenizer endpoints (`path` under
        `tokenizer_url`); its errors translated as a completion's are."""
        base = self._settings.tokenizer_url or _server_root(self._settings.base_url)
        body = None if fields is None else encoder.encode(fields)
        raw = await self._whole(await self._send(method, base.rstrip("/") + path, body, self.timeouts))
        try:
            return msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            raise UpstreamUnavailable(
                f"Provider {self.name} sent a {path} answer that is not JSON llmrouter reads."
            ) from None

    async def _events(
        self, resp: aiohttp.ClientResponse, *, first: float, idle: float
    ) -> AsyncIterator[bytes]:
        """The `data:` payloads of an SSE stream, up to `[DONE]`; a stream that stops before it
        is a failure. Lines are split here rather than by aiohttp's readline, which refuses lines
        over its buffer size (a long completion in one chunk is a long line)."""
        buffer = bytearray()
        scanned = 0  # bytes of `buffer` known to hold no newline
        data: list[bytes] = []
        wait = first
        while True:
            try:
                async with asyncio.timeout(wait):
                    chunk = await resp.content.readany()
            except Exception as exc:
                raise self._transport_error(exc) from None
            if not chunk:
                raise UpstreamUnavailable(
                    f"Provider {self.name} ended the stream before it was complete."
                )
            buffer += chunk
            start = 0
            while (newline := buffer.find(b"\n", scanned)) >= 0:
                line = bytes(buffer[start:newline]).rstrip(b"\r")
                start = scanned = newline + 1
                if line.startswith(b"data:"):
                    data.append(line[5:].lstrip(b" "))
                elif not line and data:
                    payload = b"\n".join(data)
                    data = []
                    if payload == b"[DONE]":
                        return
                    wait = idle
                    yield payload
            del buffer[:start]
            scanned = len(buffer)
            if scanned > _MAX_SSE_LINE:
                raise UpstreamUnavailable(
                    f"Provider {self.name} sent a stream line over {_MAX_SSE_LINE} bytes."
                )

    def _part(self, parsed: _Body) -> StreamPart:
        choices = [
            ChunkChoice(
                text=c.text,
                index=c.index,
                logprobs=c.logprobs,
                finish_reason=(
                    normalise_finish_reason(c.finish_reason)  # type: ignore[arg-type]
                    if c.finish_reason is not None
                    else None
                ),
                native_finish_reason=c.finish_reason if c.finish_reason is not None else UNSET,
                reasoning=c.reasoning or c.reasoning_content,
            )
            for c in parsed.choices
        ]
        u = parsed.usage
        return StreamPart(
            choices=choices,
            usage=Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens) if u else None,
            system_fingerprint=parsed.system_fingerprint or UNSET,
        )

    # -- translating failures -----------------------------------------------------------------

    def _decode(self, raw: bytes) -> _Body:
        try:
            parsed = _body_decoder.decode(raw)
        except msgspec.DecodeError:
            raise UpstreamUnavailable(
                f"Provider {self.name} sent a response that is not a valid completion."
            ) from None
        if parsed.error is not None:
            message = parsed.error if isinstance(parsed.error, str) else parsed.error.message
            said = self._redact(message)[:_MAX_ERROR_TEXT]
            raise UpstreamUnavailable(f"Provider {self.name} reported an error: {said}")
        return parsed

    @staticmethod
    async def _read_safely(resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.content.read(64 * 1024)
        except Exception:
            return b""

    def _status_error(self, resp: aiohttp.ClientResponse, raw: bytes) -> LlmrouterError:
        status = resp.status
        if 300 <= status < 400:
            return UpstreamUnavailable(
                f"Provider {self.name} answered {status}, a redirect, which llmrouter does not "
                "follow: set its base_url to where it points."
            )
        detail, code = _error_detail(raw)
        detail = self._redact(detail)[:_MAX_ERROR_TEXT]
        said = f"Provider {self.name} answered {status}" + (f": {detail}" if detail else ".")
        if status in (400, 413, 422):
            lowered = detail.lower()
            if code == "context_length_exceeded" or "maximum context length" in lowered:
                return ContextLengthExceeded(said)
            if code in _REFUSAL_CODES or "content management policy" in lowered:
                return UpstreamRefused(said)
        if status in (401, 403):
            return UpstreamAuthFailed(
                f"Provider {self.name} refused llmrouter's credentials ({status})."
            )
        if status == 429:
            return UpstreamRateLimited(
                said, retry_after=parse_retry_after(resp.headers.get("retry-after"))
            )
        if status in (400, 422):
            return UpstreamRejected(said)
        if status == 408:
            return UpstreamTimeout(said)
        return UpstreamUnavailable(said, retry_after=parse_retry_after(resp.headers.get("retry-after")))

    def _transport_error(self, exc: BaseException) -> ProviderError:
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return UpstreamTimeout(f"Provider {self.name} did not answer in time.")
        if isinstance(exc, aiohttp.ClientConnectionError | OSError):
            return UpstreamUnavailable(f"Provider {self.name} is unreachable: {type(exc).__name__}.")
        return UpstreamUnavailable(f"Provider {self.name} failed: {type(exc).__name__}.")


class _UpstreamTokenizer:
    """An upstream's tokenizer endpoints, vLLM's or llama.cpp's server's, in vLLM's terms."""

    def __init__(self, adapter: OpenAIAdapter, model: str) -> None:
        self._adapter = adapter
        self._model = model
        self._kind = adapter._settings.tokenizer
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


def _default_max_tokens(defaults: dict[str, Any]) -> int | None:
    """What a request without `max_tokens` gets: the `defaults` (null, or llama.cpp's -1: no
    limit), else the Completions API's 16, which llmrouter sends where it must know it."""
    if "max_tokens" not in defaults:
        return 16
    value = defaults["max_tokens"]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


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
    except msgspec.DecodeError:
        return raw.decode("utf-8", errors="replace").strip(), None
    if isinstance(parsed.error, str):
        return parsed.error, None
    if parsed.error is not None:
        code = parsed.error.code
        return parsed.error.message, None if code is None else str(code)
    return "", None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date; at most an hour,
    and nothing for a value that is not a finite time."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER)
