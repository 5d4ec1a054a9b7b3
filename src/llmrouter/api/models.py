"""GET /api/v1/models (and /v1/models): OpenAI's list format, with context length and parameters;
a key or token limited to some models sees those."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrouter.api.http import Request, send_bytes
from llmrouter.emulation.shape import honoured_parameters
from llmrouter.wire.completions import ModelCard, ModelList, encoder

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["list_models"]

# Fields llmrouter itself honours for every model, whatever the deployment.
_ROUTER_PARAMETERS = ("max_tokens", "metadata", "model", "models", "stream_options", "user")


def model_list(ctx: Context, allowed: frozenset[str] | None = None) -> ModelList:
    """The models, or only those of them a principal limited to `allowed` may use."""
    permitted = (
        None
        if allowed is None
        else {ctx.catalog.models[m].id for m in allowed if m in ctx.catalog.models}
    )
    cards: list[ModelCard] = []
    for model in ctx.settings.models:
        if permitted is not None and model.id not in permitted:
            continue
        targets = ctx.catalog.targets[model.id]
        supported = set(_ROUTER_PARAMETERS)
        for target in targets:
            supported |= honoured_parameters(target.capabilities)
        owner = model.owned_by or model.id.split("/", 1)[0]
        cards.extend(
            ModelCard(
                id=name,
                created=ctx.started_at,
                owned_by=owner,
                context_length=ctx.catalog.context_length(model),
                supported_parameters=sorted(supported),
            )
            for name in (model.id, *model.aliases)
        )
    return ModelList(data=cards)


async def list_models(req: Request, ctx: Context) -> None:
    principal = await ctx.auth.principal(req.header(b"authorization"))
    await send_bytes(
        req.send,
        200,
        encoder.encode(model_list(ctx, principal.limits.models)),
        [(b"x-request-id", req.request_id.encode())],
    )
