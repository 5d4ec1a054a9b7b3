"""Who is calling, and within which limits: the one type the edge hands inward after auth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmrouter.settings import Policy

__all__ = ["UNLIMITED", "Principal"]

UNLIMITED = Policy()


@dataclass(frozen=True, slots=True)
class Principal:
    """An API key or a JWT subject.

    `id` names it in counters and the ledger: `key:<key id>` or `jwt:<issuer> <subject>`."""

    id: str
    kind: Literal["key", "jwt"]
    name: str  # the key's name, or the token's subject
    limits: Policy = UNLIMITED  # `limits.models` is the models it may ask for (None: all)
    owner: str | None = None
    admin: bool = False
    key_id: str | None = None
    expires_at: int | None = None  # unix seconds

    def may_use(self, model: str) -> bool:
        return self.limits.models is None or model in self.limits.models
