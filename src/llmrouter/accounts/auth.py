"""The edge's one question: who sent this `Authorization` header? An llmrouter key (`lr-...`) or
a JWT from a configured issuer; anything else is a 401."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmrouter.accounts.keys import PREFIX, Keys
from llmrouter.accounts.principal import Principal
from llmrouter.errors import AuthenticationFailed, PermissionDenied

if TYPE_CHECKING:
    from llmrouter.accounts.jwt import JwtAuthenticator

__all__ = ["Authenticator"]


class Authenticator:
    def __init__(self, keys: Keys, jwt: JwtAuthenticator | None) -> None:
        self._keys = keys
        self._jwt = jwt

    async def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer lr-...'.",
                code="missing_api_key",
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed(
                "Malformed Authorization header: expected 'Bearer <key>'.", code="invalid_api_key"
            )
        if token.startswith(PREFIX):
            return await self._keys.authenticate(token)
        if token.count(".") == 2:
            if self._jwt is None:
                raise AuthenticationFailed(
                    "JWT bearer tokens are not accepted here: no issuer is configured.",
                    code="invalid_token",
                )
            return self._jwt.authenticate(token)
        raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")

    async def admin(self, authorization: str | None) -> Principal:
        principal = await self.principal(authorization)
        if not principal.admin:
            raise PermissionDenied("This endpoint needs an admin key.", code="admin_required")
        return principal
