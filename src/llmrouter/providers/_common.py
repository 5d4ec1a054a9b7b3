"""What every adapter of an upstream reached over HTTP shares, whatever its wire format: the
transport, the redaction of what it sends, the limits its config declares, and the small pieces
of translation that are the same for every chat API (a prompt as one user message, logprobs in
the Completions shape).

A kind's own file subclasses `HttpAdapter` and writes the translation: build the request body,
read an answer, read a stream event, read an error body.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import msgspec
from msgspec import UNSET

from llmrouter.errors import InvalidRequest, LlmrouterError, UpstreamUnavailable
from llmrouter.generation import Message
from llmrouter.obs.redact import Redactor
from llmrouter.providers import _http
from llmrouter.providers.base import ALL_PARAMETERS, Call, Capabilities, StreamPart, Tokenizer
from llmrouter.settings import CheckSettings, DeploymentSettings, HttpProvider, Timeouts
from llmrouter.wire.completions import Logprobs, Usage

__all__ = [
    "HttpAdapter",
    "LogprobsBuilder",
    "Seen",
    "call_arguments",
    "carried",
    "carry",
    "conversation",
    "default_cap",
    "instructions_apart",
    "max_tokens_for",
    "missing_logprobs",
    "own_id",
    "with_budget",
]


T = TypeVar("T")


class Seen:
    """What an OpenAI-style stream has shown so far: its `[DONE]`, a usage, how many chunks had
    text (the completion's count, for an upstream that sends none)."""

    __slots__ = ("done", "text_chunks", "usage")

    def __init__(self) -> None:
        self.done = self.usage = False
        self.text_chunks = 0

    def ended(self) -> bool:
        return self.done

    def rest(self) -> list[StreamPart]:
        """What follows `[DONE]`: nothing, or for an upstream that ignores `stream_options` and
        sends no usage (llama.cpp's server among them) an estimate. Such upstreams send a token
        a chunk, so the chunks are the completion's count; the prompt's is not known."""
        if self.usage:
            return []
        chunks = self.text_chunks
        return [StreamPart([], usage=Usage(0, chunks, chunks), usage_estimated=True)]


class HttpAdapter:
    """The shared half of an HTTP adapter. Subclasses set `native` (the request fields their wire
    format has) and implement `complete`, `stream` and `error`."""

    native: ClassVar[frozenset[str]] = ALL_PARAMETERS

    def __init__(
        self,
        name: str,
        settings: HttpProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
        transport: _http.Transport | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.checks = checks
        self.timeouts = settings.timeouts
        self.transport = transport or _http.HttpTransport(name, max_connections=settings.max_connections)
        # What this provider sends that must never come back out in what it (or a proxy) says.
        self.redact = Redactor([settings.api_key, *settings.headers.values()])

    async def start(self) -> None:
        await self.transport.start()

    async def aclose(self) -> None:
        await self.transport.aclose()

    def usable(self, deployment: DeploymentSettings) -> bool:
        return self.transport.started

    def ready(self, deployment: DeploymentSettings) -> bool:
        return self.usable(deployment)

    def context_length(self, deployment: DeploymentSettings) -> int | None:
        return None

    def tokenizer(self, deployment: DeploymentSettings) -> Tokenizer | None:
        return None

    # -- what the config declares ---------------------------------------------------------------

    def _lacking(self, deployment: DeploymentSettings) -> frozenset[str]:
        """What the config says this deployment lacks: its provider's and its own."""
        return self.settings.unsupported_parameters | deployment.unsupported_parameters

    def _lacks(self, deployment: DeploymentSettings, name: str) -> bool:
        """`name in self._lacking(deployment)`, without building the set (a call's question)."""
        return name in self.settings.unsupported_parameters or name in deployment.unsupported_parameters

    def parameters(self, deployment: DeploymentSettings) -> frozenset[str]:
        """The request fields this deployment takes natively."""
        return self.native - self._lacking(deployment)

    def chat_capabilities(self, deployment: DeploymentSettings, **own: Any) -> Capabilities:
        """What every chat API is: a conversation or one string prompt a call, no token ids, no
        `max_tokens: 0`; the rest is the config's and the kind's own (`own`)."""
        return Capabilities(
            parameters=self.parameters(deployment),
            ranges=self.ranges(deployment),
            token_prompts=False,
            prompt_batch=False,
            max_tokens_zero=False,
            default_max_tokens=default_cap(self.settings.defaults),
            chat=True,
            vision=deployment.vision,
            **own,
        )

    def decoded(self, decoder: msgspec.json.Decoder[T], raw: bytes, what: str) -> T:
        """An upstream's JSON in its type, or the deployment's failure: not JSON, not the shape,
        or nested past what a decoder follows."""
        try:
            return decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            raise UpstreamUnavailable(
                f"Provider {self.name} sent {what} llmrouter cannot read."
            ) from None

    def ranges(self, deployment: DeploymentSettings) -> dict[str, tuple[float | None, float | None]]:
        merged = {**self.settings.ranges, **deployment.ranges}
        return {name: (r.min, r.max) for name, r in merged.items()}

    # -- sending ----------------------------------------------------------------------------------

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The configured headers with the kind's own (credentials, version) and `extra`."""
        return {"content-type": "application/json", **self.settings.headers, **(extra or {})}

    async def post(self, url: str, body: bytes, timeouts: Timeouts, headers: Mapping[str, str]) -> bytes:
        """One whole exchange: the body of a 200, or the error the response is."""
        response = await self.transport.send(_http.Request("POST", url, body, headers), timeouts)
        return await _http.read_whole(response, self._error)

    @contextlib.asynccontextmanager
    async def events(
        self, url: str, body: bytes, timeouts: Timeouts, headers: Mapping[str, str]
    ) -> AsyncIterator[_http.EventStream]:
        """A streamed answer's events (an error status raised before any). The adapter calls
        `finish()` after its stream's last event, which gives the connection back to the pool."""
        response = await self.transport.send(_http.Request("POST", url, body, headers), timeouts)
        if response.status != 200:
            try:
                raise self._error(response, await _http.error_body(response))
            finally:
                response.release()
        stream = _http.EventStream(
            response, first=timeouts.first_token, idle=timeouts.idle, provider=self.name
        )
        try:
            yield stream
        finally:
            stream.release()

    async def parts(
        self,
        url: str,
        body: bytes | Callable[[], Awaitable[bytes]],
        timeouts: Timeouts,
        headers: Mapping[str, str],
        read: Callable[[_http.Event], StreamPart | None],
        done: Callable[[], bool],
        rest: Callable[[], list[StreamPart]] | None = None,
    ) -> AsyncIterator[list[StreamPart]]:
        """A streamed answer, as `Upstream.stream` gives it (an adapter's `stream` returns this
        generator itself, so that closing it gives the connection back at once). `body` is the
        request, or what makes it when that takes long enough to leave the event loop. `read`
        makes each event's part (None: the event adds nothing yet), and the parts of the events
        one read of the body brought go on together. After the event for which `done()` holds,
        the connection goes back to the pool and `rest()` (if given) adds the parts the stream
        ends with; a body that ends before it is the deployment's failure. A failure in the
        middle of a read comes after the parts before it."""
        if not isinstance(body, bytes):
            body = await body()
        async with self.events(url, body, timeouts, headers) as events:
            async for batch in events:
                out: list[StreamPart] = []
                failure: LlmrouterError | None = None
                for event in batch:
                    try:
                        part = read(event)
                    except LlmrouterError as exc:
                        failure = exc
                        break
                    if part is not None:
                        out.append(part)
                    if done():
                        events.finish()
                        if rest is not None:
                            out += rest()
                        break
                if out:
                    yield out
                if failure is not None:
                    raise failure
                if events.finished:
                    return
        raise self.ended_early()

    def _error(self, response: _http.Response, body: bytes) -> LlmrouterError:
        return self.error(response.status, response.headers, body)

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> LlmrouterError:
        """An error response, read in the kind's own terms (see `_http.status_error`)."""
        detail = self.redact(body.decode("utf-8", errors="replace").strip())
        return _http.status_error(self.name, status, headers, detail)

    def ended_early(self) -> LlmrouterError:
        """A stream that ended without its terminal event: a failure (before the commit point it
        falls back, after it the client gets the error event)."""
        return UpstreamUnavailable(f"Provider {self.name} ended the stream before it was complete.")


def missing_logprobs(provider: str) -> LlmrouterError:
    """An answer without the logprobs the call asked for: never passed on without them."""
    return UpstreamUnavailable(f"Provider {provider} answered without the logprobs it was asked for.")


def conversation(call: Call) -> tuple[Message, ...]:
    """What a chat API is sent: the call's conversation, or its one string prompt as one user
    message (the plan splits prompt batches and refuses token ids before a call is made)."""
    request = call.request
    if request.messages:
        return request.messages
    (prompt,) = request.prompts
    assert isinstance(prompt, str), "chat kinds take no token-id prompts"
    return (Message("user", prompt),)


def instructions_apart(messages: tuple[Message, ...]) -> tuple[str | None, list[Message]]:
    """The system and developer messages joined (for APIs that take them apart from the turns),
    and the turns."""
    said = [m.content for m in messages if m.role in ("system", "developer")]
    turns = [m for m in messages if m.role not in ("system", "developer")]
    return ("\n\n".join(said) if said else None), turns


def carry(call_id: str, kind: str, payload: str) -> str:
    """A tool call's id with what its API wants sent back with the call (its thinking, a thought
    signature): the Chat Completions format has no place of its own for it, and a client returns
    the id as it got it. Tagged with the kind, so that another kind's is never sent."""
    return f"{call_id}~{kind}.{payload}"


_CARRIERS = ("a.", "g.")  # the kinds that carry something in an id: Anthropic, Gemini


def carried(call_id: str, kind: str) -> tuple[str, str | None]:
    """The id without what any kind carried in it, and what `carry` put there for `kind` (None:
    nothing, or another kind's). An id a client made, `~` and all, is its own."""
    head, sep, tail = call_id.rpartition("~")
    if not sep or not tail.startswith(_CARRIERS):
        return call_id, None
    return head, tail[len(kind) + 1 :] if tail.startswith(kind + ".") else None


def own_id(call_id: str) -> str:
    """The id without what any kind carried in it."""
    return carried(call_id, "")[0]


def call_arguments(text: str) -> Any:
    """A call's arguments (JSON text, as the model wrote them) as the JSON value an API that
    takes them parsed wants; the client sent back text that is not JSON: a 400."""
    try:
        return msgspec.json.decode(text) if text.strip() else {}
    except (msgspec.DecodeError, RecursionError):
        raise InvalidRequest(
            "A tool call's `arguments` must be JSON (nested less deeply) for this model's API.",
            param="messages",
        ) from None


def max_tokens_for(value: Any, defaults: Mapping[str, Any], unbounded: int | None) -> int | None:
    """The output cap to send for a request's `max_tokens`: its own, else `defaults.max_tokens`,
    else the Completions API's 16; null (no limit) is `unbounded` (None: send none)."""
    if value is UNSET:
        value = defaults.get("max_tokens", 16)
    return unbounded if value is None else int(value)


def with_budget(cap: int, budget: int, ceiling: int | None) -> int:
    """An output cap with a reasoning budget on top (reasoning counts against the cap), held to
    the most the model writes, where the config says it."""
    total = cap + budget
    return total if ceiling is None else min(total, ceiling)


def default_cap(defaults: Mapping[str, Any]) -> int | None:
    """What a request without `max_tokens` gets (`Capabilities.default_max_tokens`): the
    `defaults` (null, or llama.cpp's -1: no limit), else the Completions API's 16."""
    value = defaults.get("max_tokens", 16)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class LogprobsBuilder:
    """One choice's logprobs in the Completions shape, from a chat API's per-token entries:
    `text_offset` is counted here, in characters of the text so far (across a stream's chunks).
    Where the API gives a token's bytes, the token is spelled as the text it completes: a token
    that ends inside a character is "" (OpenAI writes it `bytes:\\xc3`), and the one that ends
    the character spells all of it, so that the tokens joined are the text."""

    __slots__ = ("_decoder", "_offset")

    def __init__(self) -> None:
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def build(
        self, entries: Sequence[tuple[str, bytes | None, float, dict[str, float] | None]]
    ) -> Logprobs:
        """`entries`: (token, its bytes if known, logprob, top logprobs), in order."""
        tokens: list[str] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token, raw, logprob, top in entries:
            spelled = token if raw is None else self._decoder.decode(raw)
            tokens.append(spelled)
            logprobs.append(logprob)
            tops.append(top)
            offsets.append(self._offset)
            self._offset += len(spelled)
        no_tops = all(top is None for top in tops)  # (`logprobs: 0`)
        return Logprobs(tokens, logprobs, None if no_tops else tops, offsets)
