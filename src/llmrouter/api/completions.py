"""POST /api/v1/completions (and /v1/completions): the Completions API's side of the road
(`api/pipeline.py`): its decoder and its encoders."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from llmrouter.api.http import Request
from llmrouter.api.pipeline import Decoded, generate
from llmrouter.api.sse import ChunkStream
from llmrouter.generation import Generation, from_completions
from llmrouter.providers.base import Completion
from llmrouter.routing.plan import Target
from llmrouter.wire.completions import CompletionChunk, CompletionResponse, encoder
from llmrouter.wire.validate import Prompts, decode_completion_request

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["COMPLETIONS", "create_completion", "prompt_tokens_bound", "prompt_tokens_estimate"]


def prompt_tokens_estimate(prompts: Prompts) -> int:
    """About four characters a token; token-id prompts are counted exactly."""
    return sum(len(p) // 4 + 1 if isinstance(p, str) else len(p) for p in prompts)


def prompt_tokens_bound(prompts: Prompts) -> int:
    """At most a token a UTF-8 byte (byte-level tokenizers); token-id prompts exactly."""
    return sum(len(p.encode()) + 1 if isinstance(p, str) else len(p) for p in prompts)


class CompletionsWire:
    route = "completions"

    def decode(self, body: bytes) -> Decoded:
        params, prompts = decode_completion_request(body)
        route, request = from_completions(params, prompts)
        return Decoded(
            route, request, len(prompts), prompt_tokens_estimate(prompts), prompt_tokens_bound(prompts)
        )

    def field(self, name: str, request: Generation) -> str:
        return name  # (a Generation's fields are this API's)

    def answer(self, request_id: str, target: Target, result: Completion) -> bytes:
        return encoder.encode(
            CompletionResponse(
                id=request_id,
                created=int(time.time()),
                model=target.model.id,
                provider=target.deployment.provider,
                choices=result.choices,
                system_fingerprint=result.system_fingerprint,
                usage=result.usage,
            )
        )

    def chunks(self, request_id: str, target: Target, include_usage: bool) -> ChunkStream:
        return ChunkStream(CompletionChunk, request_id, target, include_usage)


COMPLETIONS = CompletionsWire()


async def create_completion(req: Request, ctx: Context) -> None:
    await generate(req, ctx, COMPLETIONS)
