"""Secrets out of text that came from elsewhere.

An upstream's error message is relayed to the client, and a proxy between llmrouter and the
upstream may quote the request it received, `Authorization` included. Each adapter passes what an
upstream says through its `Redactor` before the text goes anywhere (an error's message, which is
relayed, logged or stored), so the secrets it sends (its key, its configured header values) never
come back out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["REDACTED", "Redactor"]

REDACTED = "[redacted]"
# A configured value shorter than this is not treated as a secret: redacting "1" or "json" would
# garble every message, and nothing that short is a credential.
SHORTEST_SECRET = 8


class Redactor:
    """Replaces every occurrence of each secret with `[redacted]`."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str | None]) -> None:
        kept = sorted({s for s in secrets if s and len(s) >= SHORTEST_SECRET}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, kept))) if kept else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)
