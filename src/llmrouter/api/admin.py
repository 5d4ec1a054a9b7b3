"""The operator's endpoints beyond keys: `POST /api/v1/admin/reload` re-reads the config file
(reload.py), for an admin key only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from llmrouter.api.http import Request, send_bytes
from llmrouter.errors import InvalidRequest
from llmrouter.settings import ConfigError

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["reload_config"]


async def reload_config(req: Request, ctx: Context) -> None:
    """What changed (200), or the config's error (400 `invalid_config`) and nothing changed."""
    await ctx.auth.admin(req.header(b"authorization"))
    try:
        changes = await ctx.reloader.request()
    except ConfigError as exc:
        raise InvalidRequest(str(exc), code="invalid_config") from None
    body = msgspec.json.encode({"data": changes})
    await send_bytes(req.send, 200, body, [(b"x-request-id", req.request_id.encode())])
