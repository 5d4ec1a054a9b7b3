"""Loads and counts for the chaos tests: requests all at once, and the fake's hits per model."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

from tests.conftest import Router


def hits(fake: str) -> Counter[str]:
    """Requests the fake upstream has had since its reset, by model name."""
    return Counter(httpx.get(f"{fake}/_stats").json()["hits"])


def at_once(router: Router, bodies: list[dict[str, Any]]) -> list[int]:
    """POST every body to the router's /completions at the same time; their statuses."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(
            headers=router.headers(), timeout=30, limits=httpx.Limits(max_connections=len(bodies))
        ) as client:

            async def one(body: dict[str, Any]) -> int:
                return (await client.post(f"{router.api}/completions", json=body)).status_code

            return list(await asyncio.gather(*(one(b) for b in bodies)))

    return asyncio.run(run())
