"""POST /tokenize and /detokenize, GET /tokenizer_info: a model's own tokenizer, as vLLM serves it.

Served under the API prefixes and at the root, where vLLM has them (lm-evaluation-harness's
`tokenizer_backend=remote` looks there). Each request is authenticated and counts against the
caller's rate and concurrency limits like a completion, holding no tokens or credit, within the
request deadline. The tokenizer is the one the model's /completions prompts are read with: the local
engine's (with the deployment's `special_tokens` rule), or an upstream's own endpoints where its
provider declares them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

from msgspec import UNSET

from llmrouter.accounts.principal import Principal
from llmrouter.api.http import Request, send_bytes
from llmrouter.errors import DeadlineExceeded, InvalidRequest, LlmrouterError
from llmrouter.providers.base import Tokenizer
from llmrouter.routing.plan import Target
from llmrouter.wire.completions import MAX_MODEL_CHARS, encoder
from llmrouter.wire.tokenize import (
    DetokenizeResponse,
    TokenizeResponse,
    detokenize_decoder,
    tokenize_decoder,
)
from llmrouter.wire.validate import decode_body

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from llmrouter.app import Context

__all__ = ["detokenize", "tokenize", "tokenizer_info"]

T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]


async def tokenize(req: Request, ctx: Context) -> None:
    async with _admitted(req, ctx) as (principal, headers):
        body = decode_body(tokenize_decoder, await _json_body(req, ctx))
        model = None if body.model is UNSET else body.model

        async def run(target: Target, tokenizer: Tokenizer) -> TokenizeResponse:
            done = await tokenizer.tokenize(
                body.prompt, add_special=body.add_special_tokens, strings=body.return_token_strs
            )
            length = ctx.catalog.context_length(target.model) or done.max_model_len
            return TokenizeResponse(len(done.tokens), length, done.tokens, done.token_strs)

        await _answer(req, await _first(ctx, principal, model, run), headers)


async def detokenize(req: Request, ctx: Context) -> None:
    async with _admitted(req, ctx) as (principal, headers):
        body = decode_body(detokenize_decoder, await _json_body(req, ctx))
        model = None if body.model is UNSET else body.model

        async def run(target: Target, tokenizer: Tokenizer) -> DetokenizeResponse:
            return DetokenizeResponse(await tokenizer.detokenize(body.tokens))

        await _answer(req, await _first(ctx, principal, model, run), headers)


async def tokenizer_info(req: Request, ctx: Context) -> None:
    """GET, with the model in `?model=` (or the default model)."""
    async with _admitted(req, ctx) as (principal, headers):
        model = _model_in_query(req)

        async def run(target: Target, tokenizer: Tokenizer) -> dict[str, Any]:
            return {**await tokenizer.info(), "model": target.model.id}

        await _answer(req, await _first(ctx, principal, model, run, info=True), headers)


def _model_in_query(req: Request) -> str | None:
    """`?model=`, given once and not empty, as `model` in a body must be."""
    models = parse_qs(req.query.decode("latin-1"), keep_blank_values=True).get("model")
    if models is None:
        return None
    if len(models) > 1:
        raise InvalidRequest("Give `model` once.", param="model")
    if not 1 <= len(models[0]) <= MAX_MODEL_CHARS:
        raise InvalidRequest(f"`model` must be 1 to {MAX_MODEL_CHARS} characters.", param="model")
    return models[0]


@asynccontextmanager
async def _admitted(req: Request, ctx: Context) -> AsyncIterator[tuple[Principal, Headers]]:
    """The caller, let in by its limits, and the rate-limit headers for its answer; settled
    however the request ends."""
    principal = await ctx.auth.principal(req.header(b"authorization"))
    req.log["principal"] = principal.id
    admission = await ctx.limiter.admit(principal, req.request_id, 0)
    try:
        yield principal, admission.headers
    finally:
        await asyncio.shield(ctx.limiter.settle(admission, 0, 0.0))


async def _json_body(req: Request, ctx: Context) -> bytes:
    req.require_json()
    return await req.body(ctx.settings.server.max_body_bytes)


async def _first(
    ctx: Context,
    principal: Principal,
    model: str | None,
    run: Callable[[Target, Tokenizer], Awaitable[T]],
    *,
    info: bool = False,
) -> T:
    """`run` on the model's first tokenizer that answers, within the request deadline; a
    deployment that fails in a way another may not (unreachable, rate limited) passes to the
    next."""
    targets = ctx.catalog.tokenizers(model, principal.limits.models, info=info)
    last: LlmrouterError | None = None
    try:
        async with asyncio.timeout(ctx.settings.routing.deadline_seconds):
            for target, tokenizer in targets:
                try:
                    return await run(target, tokenizer)
                except LlmrouterError as exc:
                    if not exc.retryable:
                        raise
                    last = exc.with_traceback(None)
    except TimeoutError:
        raise DeadlineExceeded("The request's deadline passed.") from None
    assert last is not None
    raise last


async def _answer(req: Request, value: object, headers: Headers) -> None:
    await send_bytes(req.send, 200, encoder.encode(value), headers)
