"""Unauthenticated endpoints: liveness, readiness, and the OpenAPI document."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrouter.api.http import Request, send_bytes
from llmrouter.errors import ServiceUnavailable

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["health", "openapi", "ready"]


async def health(req: Request, ctx: Context) -> None:
    await send_bytes(req.send, 200, b'{"status":"ok"}', [])


async def ready(req: Request, ctx: Context) -> None:
    if not await ctx.db.ping():
        raise ServiceUnavailable("The database cannot be reached.", retry_after=1)
    if not any(t.provider.ready(t.deployment) for t in ctx.catalog.all_targets()):
        raise ServiceUnavailable("No deployment is usable yet.", retry_after=1)
    await send_bytes(req.send, 200, b'{"status":"ready"}', [])


async def openapi(req: Request, ctx: Context) -> None:
    await send_bytes(req.send, 200, ctx.openapi, [])
