"""What every chaos module shares: the fake upstream made new for each test."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture
def fake(fake_upstream: str) -> str:
    """The fake upstream, its counts cleared and its `switch` model answering again."""
    httpx.post(f"{fake_upstream}/_reset")
    httpx.post(f"{fake_upstream}/_control", json={"switch": "ok"})
    return fake_upstream
