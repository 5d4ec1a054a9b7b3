"""POST /api/v1/completions (and /v1/completions): edge -> plan -> executor -> response."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from msgspec import UNSET

from llmrouter.api.http import Request
from llmrouter.api.sse import DONE, KEEPALIVE, event, start_stream
from llmrouter.errors import LlmrouterError
from llmrouter.routing.executor import Attempt, OpenStream
from llmrouter.routing.plan import Plan, Target
from llmrouter.structured import check_request_format
from llmrouter.wire.completions import (
    CompletionChunk,
    CompletionCreateParams,
    CompletionResponse,
    Usage,
    encoder,
)
from llmrouter.wire.validate import Prompts, decode_completion_request

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["create_completion"]


async def create_completion(req: Request, ctx: Context) -> None:
    principal = ctx.keys.authenticate(req.header(b"authorization"))
    req.log["key_id"] = principal.key_id
    req.require_json()
    params, prompts = decode_completion_request(await req.body(ctx.settings.server.max_body_bytes))
    check_request_format(params.response_format)
    # Kept with the request's record (never sent upstream unless the provider forwards them).
    if params.user is not UNSET:
        req.log["user"] = params.user
    if params.metadata:
        req.log["metadata"] = params.metadata
    plan = ctx.catalog.plan(params, prompts)
    if params.stream:
        await _stream(req, ctx, plan, params, prompts)
        return
    target, result, attempts = await ctx.executor.complete(plan, params, prompts, req.request_id)
    _note(req, target, attempts, result.usage)
    response = CompletionResponse(
        id=req.request_id,
        created=int(time.time()),
        model=target.model.id,
        provider=target.deployment.provider,
        choices=result.choices,
        system_fingerprint=result.system_fingerprint,
        usage=result.usage,
    )
    body = encoder.encode(response)
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
            ],
        }
    )
    await req.send({"type": "http.response.body", "body": body})


async def _stream(
    req: Request, ctx: Context, plan: Plan, params: CompletionCreateParams, prompts: Prompts
) -> None:
    send = req.send
    include_usage = bool(params.stream_options and params.stream_options.include_usage)
    headers = [(b"x-request-id", req.request_id.encode())]
    opening = asyncio.ensure_future(ctx.executor.open_stream(plan, params, prompts, req.request_id))
    started = False
    try:
        # Until the first token, errors are plain HTTP errors. If it is slow to come, commit to
        # the stream and send comment lines so that proxies keep the connection open.
        while not opening.done():
            await asyncio.wait((opening,), timeout=ctx.settings.server.keepalive_seconds)
            if not opening.done():
                if not started:
                    await start_stream(send, headers)
                    started = True
                await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
    except BaseException:
        # The client left (or sending failed): stop the attempts, and release a stream that
        # opened in the same moment.
        opening.cancel()
        await asyncio.wait((opening,))
        if not opening.cancelled() and opening.exception() is None:
            await opening.result().aclose()
        raise
    try:
        stream = opening.result()
    except LlmrouterError as exc:
        req.log["attempts"] = exc.attempts
        if not started:
            raise
        await _end_with_error(req, exc)
        return
    try:
        if not started:
            headers.append((b"x-llmrouter-attempts", _attempts_header(stream.attempts)))
            headers.extend(_emulated_header(stream.target))
            await start_stream(send, headers)
        await _relay(req, stream, include_usage)
    finally:
        await stream.aclose()  # idempotent; covers a client that left before the relay began


async def _relay(req: Request, stream: OpenStream, include_usage: bool) -> None:
    """Send the committed stream's parts as chunks; a failure now ends the stream."""
    target = stream.target
    created = int(time.time())
    usage: Usage | None = None
    chunk = CompletionChunk(
        id=req.request_id,
        created=created,
        model=target.model.id,
        provider=target.deployment.provider,
        choices=[],
        usage=None if include_usage else UNSET,
    )
    part = stream.first
    try:
        while True:
            if part.usage is not None:
                usage = part.usage
                if part.usage_estimated:
                    req.log["usage_estimated"] = True
            if part.choices:
                chunk.choices = part.choices
                chunk.system_fingerprint = part.system_fingerprint
                await req.send(
                    {
                        "type": "http.response.body",
                        "body": event(encoder.encode(chunk)),
                        "more_body": True,
                    }
                )
            try:
                part = await anext(stream.rest)
            except StopAsyncIteration:
                break
    except LlmrouterError as exc:
        _note(req, target, stream.attempts, usage)
        await _end_with_error(req, exc)
        return
    finally:
        await stream.aclose()
    _note(req, target, stream.attempts, usage)
    tail = b""
    if include_usage:
        chunk.choices = []
        chunk.usage = usage or Usage(0, 0, 0)
        tail = event(encoder.encode(chunk))
    await req.send({"type": "http.response.body", "body": tail + DONE, "more_body": False})


async def _end_with_error(req: Request, exc: LlmrouterError) -> None:
    req.log["stream_error"] = exc.code
    body = event(encoder.encode(exc.to_body()))
    await req.send({"type": "http.response.body", "body": body, "more_body": False})


def _note(req: Request, target: Target, attempts: list[Attempt], usage: Usage | None) -> None:
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
