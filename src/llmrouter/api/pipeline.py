"""The one road of a generation request, whichever API it came in on: edge -> plan -> executor
-> response.

At the edge: who is calling (a key or a JWT), may they use the model, and is the request within
their limits (one round trip to the limiter). At the end: the usage is settled with the limiter,
and the response's last bytes wait until the ledger holds its record.

The APIs (`api/completions.py`, `api/chat.py`) differ only in their `Wire`: how a body is decoded
into a `Route` and a `Generation`, and how an answer and a stream's parts are encoded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec
from msgspec import UNSET

from llmrouter.accounts.ledger import Record
from llmrouter.accounts.principal import Principal
from llmrouter.api.http import Request
from llmrouter.api.sse import DONE, Keepalive, event, start_stream
from llmrouter.errors import LlmrouterError, ServiceUnavailable, UnsupportedParameter
from llmrouter.generation import Generation, Route
from llmrouter.providers.base import Completion, StreamPart
from llmrouter.routing.plan import Catalog, Plan, Target
from llmrouter.routing.resume import Splice
from llmrouter.routing.streams import Attempt, OpenStream, produced
from llmrouter.wire.completions import Usage, encoder

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["Accounting", "Chunks", "Decoded", "Wire", "answer_tokens", "generate"]

_DEFAULT_MAX_TOKENS = 16  # the Completions API's default
_UNKNOWN_CONTEXT = 8192  # tokens a `max_tokens: null` answer may hold when no length is known
_MODEL_NAME_KEPT = 256  # characters of the requested model's name in the record


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request body, decoded by its API and split."""

    route: Route
    request: Generation
    inputs: int  # prompts (a conversation is one): each gets `n` answers
    prompt_estimate: int  # its tokens, about (the limits' first guess)
    prompt_bound: int  # at most this many (the credit hold's)
    thinking: int = 0  # tokens an answer may think besides its own (a reasoning budget)


class Chunks(Protocol):
    """One stream's encoder: SSE events for its parts, in the API's chunk format."""

    def retarget(self, target: Target) -> None:
        """The stream resumed on another deployment: its chunks name that one from now on."""

    def parts(self, parts: list[StreamPart]) -> bytes:
        """The events for some parts' choices (each has some), one after another."""

    def usage(self, usage: Usage) -> bytes:
        """The event for the usage, after the last choices."""


class Wire(Protocol):
    """An API's side of the road: its decoder and encoders."""

    route: str  # its name in the ledger and the log: "completions", "chat.completions"

    def decode(self, body: bytes) -> Decoded: ...

    def field(self, name: str, request: Generation) -> str:
        """The request field a `Generation` field came from (a refusal names it)."""

    def answer(self, request_id: str, target: Target, result: Completion) -> bytes:
        """The whole answer's body."""

    def chunks(self, request_id: str, target: Target, include_usage: bool) -> Chunks: ...


@dataclass(slots=True)
class Accounting:
    """What the ledger records about one request, gathered on its way through."""

    principal: Principal
    route: str = "completions"
    model_requested: str = ""
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    user: str | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    target: Target | None = None
    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    ttft_ms: float | None = None
    prompt_estimate: int = 0
    recorded: bool = False  # the handler wrote it; otherwise the app does, after the handler
    splice: Splice | None = None  # a stream that could move between deployments
    # With `accounts.store_prompts` on: the most characters of each text kept (None: none kept),
    # the prompt, and the answer's text as sent (a stream's, gathered as it goes).
    text_chars: int | None = None
    prompt_text: str | None = None
    answer_parts: list[str] = field(default_factory=list)
    answer_chars: int = 0

    def keep_answer(self, text: str) -> None:
        if self.text_chars is not None and text and self.answer_chars < self.text_chars:
            self.answer_parts.append(text)
            self.answer_chars += len(text)

    @property
    def cost(self) -> float:
        if self.target is None or self.usage is None:
            return 0.0
        if self.splice is not None and self.splice.resumed:  # each deployment at its price
            return self.splice.cost(self.usage)
        return self.target.cost(self.usage.prompt_tokens, self.usage.completion_tokens)

    def record(self, request_id: str, status: int, error: str | None) -> Record:
        usage = self.usage
        if error == "client_disconnected":
            status = 499
        return Record(
            request_id=request_id,
            principal=self.principal.id,
            route=self.route,
            user=self.user,
            metadata=self.metadata,
            model_requested=self.model_requested,
            model=self.target.model.id if self.target else None,
            provider=self.target.deployment.provider if self.target else None,
            attempts=[str(a) for a in self.attempts],
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost=self.cost,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            ttft_ms=self.ttft_ms,
            status=status,
            error=error,
            finish_reason=self.finish_reason,
            stream=self.stream,
            created_at=self.created_at,
            finished_at=time.time(),
            prompt_text=self.prompt_text,
            answer_text=None
            if self.text_chars is None
            else "".join(self.answer_parts)[: self.text_chars],
        )


def answer_tokens(request: Generation, route: Route, catalog: Catalog) -> int:
    """The most tokens one answer may hold: `max_tokens`, 16 when it is not set, and when it is
    null the longest context of the models named (looked up only then)."""
    if isinstance(request.max_tokens, int):
        return request.max_tokens
    if request.max_tokens is UNSET:
        return _DEFAULT_MAX_TOKENS
    return catalog.longest_context(route) or _UNKNOWN_CONTEXT


async def generate(req: Request, ctx: Context, wire: Wire) -> None:
    principal = await ctx.auth.principal(req.header(b"authorization"))
    req.log["principal"] = principal.id
    if ctx.ledger.backlogged:  # refused before it has a record: the backlog must not grow
        raise ServiceUnavailable("The usage ledger cannot keep up; try again.", retry_after=1)
    acc = req.accounting = Accounting(principal, wire.route)
    try:
        req.require_json()
        decoded = wire.decode(await req.body(ctx.settings.server.max_body_bytes))
    except LlmrouterError:
        # A request that does not parse is recorded too, so it counts against the rate limit
        # (a 429 then, rather than its 400).
        await ctx.limiter.settle(await ctx.limiter.admit(principal, req.request_id, 0), 0, 0.0)
        raise
    route, request = decoded.route, decoded.request
    model = _first_model(route, ctx.catalog.default_model)
    acc.model_requested = model[:_MODEL_NAME_KEPT]  # a name that matched nothing may be long
    acc.stream = request.stream
    acc.prompt_estimate = decoded.prompt_estimate
    if ctx.settings.accounts.store_prompts:
        acc.text_chars = ctx.settings.accounts.stored_text_chars
        acc.prompt_text = _prompt_text(request)[: acc.text_chars]
    # Kept with the request's record (never sent upstream unless the provider forwards them).
    if request.user is not UNSET:
        acc.user = req.log["user"] = request.user
    if request.metadata:
        acc.metadata = req.log["metadata"] = request.metadata
    # Every request that gets this far counts against the limits, valid or not. Tokens per minute
    # reserve the prompts and the most the answers may hold.
    per_prompt = max(request.n or 1, request.best_of or 1)
    per_answer = answer_tokens(request, route, ctx.catalog) + decoded.thinking
    answers = decoded.inputs * per_prompt * per_answer
    cost = 0.0
    if principal.limits.credit_limit is not None:
        # Credit is held for about the most it could cost until its real cost is known: every
        # prompt token bound, once per answer (a deployment without `n` is asked once per
        # answer), and every answer token, at the dearest deployment of its models.
        bound = decoded.prompt_bound * per_prompt
        cost = ctx.catalog.dearest_cost(route, bound, answers)
    admission = await ctx.limiter.admit(principal, req.request_id, acc.prompt_estimate + answers, cost)
    try:
        checker = await ctx.catalog.checks.admit(request.response_format)
        ctx.catalog.check_allowed(route, principal.limits.models)
        try:
            plan = ctx.catalog.plan(route, request, checker)
        except UnsupportedParameter as exc:  # named as the client wrote it
            exc.param = wire.field(exc.param or "", request)
            raise
        if request.stream:
            await _stream(req, ctx, wire, plan, route, request, admission.headers)
        else:
            await _complete(req, ctx, wire, plan, request, admission.headers)
    finally:
        if admission.counted:
            usage = acc.usage
            tokens = usage.prompt_tokens + usage.completion_tokens if usage else 0
            await asyncio.shield(ctx.limiter.settle(admission, tokens, acc.cost))


def _prompt_text(request: Generation) -> str:
    """The request's input as the request log shows it: a conversation's turns as `role: text`
    lines, one prompt as it is, several (or token ids) as JSON."""
    if request.messages:
        return "\n".join(f"{m.role}: {m.content}" for m in request.messages)
    if len(request.prompts) == 1 and isinstance(request.prompts[0], str):
        return request.prompts[0]
    return msgspec.json.encode(request.prompts).decode()


def _first_model(route: Route, default: str) -> str:
    if route.model is not None:
        return route.model
    return route.models[0] if route.models else default


async def _complete(
    req: Request,
    ctx: Context,
    wire: Wire,
    plan: Plan,
    request: Generation,
    limit_headers: list[tuple[bytes, bytes]],
) -> None:
    try:
        target, result, attempts = await ctx.executor.complete(plan, request, req.request_id)
    except LlmrouterError as exc:  # the record of a failure names its attempts too
        _accounting(req).attempts = exc.attempts
        raise
    if _excluded(request):
        result.choices = [msgspec.structs.replace(c, reasoning=None) for c in result.choices]
    _note(req, target, attempts, result.usage)
    if result.choices:
        _accounting(req).finish_reason = result.choices[0].finish_reason
        _accounting(req).keep_answer(result.choices[0].text)
    body = wire.answer(req.request_id, target, result)
    await _commit_record(req, ctx, 200)  # durable before the client has the answer
    await req.send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", req.request_id.encode()),
                (b"x-llmrouter-attempts", _attempts_header(attempts)),
                *_emulated_header(target),
                *limit_headers,
            ],
        }
    )
    await req.send({"type": "http.response.body", "body": body})


def _accounting(req: Request) -> Accounting:
    assert req.accounting is not None, "create_completion sets it first"
    return req.accounting


async def _commit_record(req: Request, ctx: Context, status: int, error: str | None = None) -> None:
    acc = _accounting(req)
    acc.recorded = True
    await ctx.ledger.commit(acc.record(req.request_id, status, error))


async def _stream(
    req: Request,
    ctx: Context,
    wire: Wire,
    plan: Plan,
    route: Route,
    request: Generation,
    limit_headers: list[tuple[bytes, bytes]],
) -> None:
    include_usage = request.include_usage
    headers = [(b"x-request-id", req.request_id.encode()), *limit_headers]
    # Until the first token, errors are plain HTTP errors. If it is slow to come, the stream is
    # committed to and comment lines keep proxies from closing the connection.
    keepalive = Keepalive(req.send, headers, ctx.settings.server.keepalive_seconds)
    try:
        stream = await ctx.executor.open_stream(plan, request, req.request_id, resume=route.resume)
    except LlmrouterError as exc:
        req.log["attempts"] = _accounting(req).attempts = exc.attempts
        if not await keepalive.stop():
            raise
        await _end_with_error(req, ctx, exc)
        return
    except BaseException:  # (the client left, or a comment's send failed: that is raised)
        await keepalive.stop()
        raise
    try:
        if not await keepalive.stop():
            headers.append((b"x-llmrouter-attempts", _attempts_header(stream.attempts)))
            headers.extend(_emulated_header(stream.target))
            await start_stream(req.send, headers)
        chunks = wire.chunks(req.request_id, stream.target, include_usage)
        await _relay(req, ctx, stream, chunks, request)
    finally:
        await stream.aclose()  # idempotent; covers a client that left before the relay began


async def _relay(
    req: Request, ctx: Context, stream: OpenStream, chunks: Chunks, request: Generation
) -> None:
    """Send the committed stream's parts as chunks, each batch in one write; a failure now ends
    the stream."""
    target = stream.target
    usage: Usage | None = None
    acc = _accounting(req)
    acc.target, acc.attempts, acc.splice = target, stream.attempts, stream.rest.splice
    deltas = 0  # text parts sent: the completion tokens, if the stream is cut before its usage
    excluded = _excluded(request)
    parts = stream.first
    try:
        while True:
            if acc.splice is not None and acc.splice.target is not target:  # resumed elsewhere
                target = acc.target = acc.splice.target
                chunks.retarget(target)
            sending: list[StreamPart] = []
            for part in parts:
                if part.usage is not None:
                    usage = acc.usage = part.usage
                    if part.usage_estimated:
                        req.log["usage_estimated"] = True
                if excluded and part.choices:  # (what was only thinking is not sent at all)
                    kept = [msgspec.structs.replace(c, reasoning=None) for c in part.choices]
                    part.choices = [c for c in kept if produced(StreamPart([c]))]
                if part.choices:
                    for choice in part.choices:
                        deltas += bool(choice.text or choice.reasoning or choice.tool_calls)
                        if choice.index == 0:
                            acc.keep_answer(choice.text)
                            if choice.finish_reason is not None:
                                acc.finish_reason = choice.finish_reason
                    sending.append(part)
            if sending:
                if acc.ttft_ms is None:
                    acc.ttft_ms = round((time.perf_counter() - acc.started) * 1000, 3)
                body = chunks.parts(sending)
                await req.send({"type": "http.response.body", "body": body, "more_body": True})
            try:
                parts = await anext(stream.rest)
            except StopAsyncIteration:
                break
    except LlmrouterError as exc:  # the upstream failed, or the deadline passed
        _note(req, target, stream.attempts, usage or _sent(req, acc, deltas))
        await _end_with_error(req, ctx, exc)
        return
    finally:
        await stream.aclose()
        if acc.usage is None:  # the client left
            acc.usage = _sent(req, acc, deltas)
    if usage is None:  # it ended without its count (a resumed stream's end was lost)
        usage = acc.usage  # what was sent, counted just above
    _note(req, target, stream.attempts, usage)
    tail = chunks.usage(usage or Usage(0, 0, 0))
    await _commit_record(req, ctx, 200)
    await req.send({"type": "http.response.body", "body": tail + DONE, "more_body": False})


def _excluded(request: Generation) -> bool:
    """The request's `reasoning.exclude`: the answer leaves the thinking out."""
    return request.reasoning is not None and bool(request.reasoning.exclude)


def _sent(req: Request, acc: Accounting, deltas: int) -> Usage | None:
    """The usage of a stream cut before its count came: what was sent (a text part a token)."""
    if not deltas:
        return None
    req.log["usage_estimated"] = True
    return Usage(acc.prompt_estimate, deltas, acc.prompt_estimate + deltas)


async def _end_with_error(req: Request, ctx: Context, exc: LlmrouterError) -> None:
    """A committed stream's failure: one error event, its record durable before it."""
    req.log["stream_error"] = exc.code
    body = event(encoder.encode(exc.to_body()))
    await _commit_record(req, ctx, 200, exc.code)
    await req.send({"type": "http.response.body", "body": body, "more_body": False})


def _note(req: Request, target: Target, attempts: list[Attempt], usage: Usage | None) -> None:
    acc = _accounting(req)
    acc.target, acc.attempts, acc.usage = target, attempts, usage
    req.log["model"] = target.model.id
    req.log["provider"] = target.deployment.provider
    if target.shape is not None and target.shape.emulated:
        req.log["emulated"] = list(target.shape.emulated)
    req.log["attempts"] = attempts  # encoded as strings by the log line (Attempt.__str__)
    if usage is not None:
        req.log["prompt_tokens"] = usage.prompt_tokens
        req.log["completion_tokens"] = usage.completion_tokens


def _emulated_header(target: Target) -> list[tuple[bytes, bytes]]:
    """Which request fields llmrouter itself honoured for the deployment that answered."""
    emulated = target.shape.emulated if target.shape is not None else ()
    return [(b"x-llmrouter-emulated", ", ".join(emulated).encode())] if emulated else []


def _attempts_header(attempts: list[Attempt]) -> bytes:
    return ", ".join(str(a) for a in attempts).encode()
