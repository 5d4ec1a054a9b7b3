"""The operator's endpoints: liveness, readiness and the OpenAPI document (open), and the
metrics (to an admin key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrouter.api.http import Request, send_bytes
from llmrouter.errors import NotFound, ServiceUnavailable, quoted
from llmrouter.obs.metrics import CONTENT_TYPE, exposition

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["health", "metrics", "openapi", "ready"]


async def health(req: Request, ctx: Context) -> None:
    await send_bytes(req.send, 200, b'{"status":"ok"}', [])


async def ready(req: Request, ctx: Context) -> None:
    if not await ctx.db.ping():
        raise ServiceUnavailable("The database cannot be reached.", retry_after=1)
    if not any(t.provider.ready(t.deployment) for t in ctx.catalog.all_targets()):
        raise ServiceUnavailable("No deployment is usable yet.", retry_after=1)
    await send_bytes(req.send, 200, b'{"status":"ready"}', [])


async def metrics(req: Request, ctx: Context) -> None:
    """GET /metrics: Prometheus's text format, to an admin key (a scraper's `authorization`
    credentials). Not here at all when metrics are off or served on their own address."""
    if ctx.metrics is None or ctx.settings.metrics.listen is not None:
        raise NotFound(f"No route {quoted(req.path)}.")
    await ctx.auth.admin(req.header(b"authorization"))
    ctx.sample()
    body = exposition(ctx.metrics)
    await send_bytes(req.send, 200, body, [], content_type=CONTENT_TYPE)


async def openapi(req: Request, ctx: Context) -> None:
    await send_bytes(req.send, 200, ctx.openapi, [])
