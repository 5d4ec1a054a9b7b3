"""The accounts API: the caller's own key (`GET /api/v1/key`), one past request's record
(`GET /api/v1/generation?id=`), and key administration (`/api/v1/keys...`, admin keys only)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from llmrouter.accounts.keys import ApiKey, KeyError_, KeyNameTaken
from llmrouter.api.http import Request, send_bytes
from llmrouter.errors import Conflict, InvalidRequest, NotFound, quoted
from llmrouter.settings import Amount, Count, Policy, Reset
from llmrouter.wire.decode import decode

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["KeyLimits", "KeySpec", "generation", "key_collection", "key_item", "key_view", "whoami"]

_encode = msgspec.json.Encoder().encode
_BODY_LIMIT = 1 << 20


class KeySpec(Struct, forbid_unknown_fields=True):
    """A new key, as the admin API and the CLI take it."""

    name: str
    owner: str | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    max_concurrent: Count | None = None
    credit_limit: Amount | None = None
    reset: Reset | None = None
    models: list[str] | None = None
    expires_at: Annotated[int, Meta(ge=0, le=2**53)] | None = None  # unix seconds
    admin: bool = False

    def policy(self) -> Policy:
        return Policy(
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrent=self.max_concurrent,
            credit_limit=self.credit_limit,
            reset=self.reset,
            models=None if self.models is None else frozenset(self.models),
        )


_key_spec = msgspec.json.Decoder(KeySpec)


class KeyLimits(Struct, forbid_unknown_fields=True):
    """New limits for a key (`PATCH /api/v1/keys/{id}`): a field left out stays as it is, and a
    null one is unlimited (`models`: every model)."""

    rpm: Count | UnsetType | None = UNSET
    tpm: Count | UnsetType | None = UNSET
    max_concurrent: Count | UnsetType | None = UNSET
    credit_limit: Amount | UnsetType | None = UNSET
    reset: Reset | UnsetType | None = UNSET
    models: list[str] | UnsetType | None = UNSET

    def applied_to(self, policy: Policy) -> Policy:
        given = {f: getattr(self, f) for f in self.__struct_fields__ if getattr(self, f) is not UNSET}
        if isinstance(given.get("models"), list):
            given["models"] = frozenset(given["models"])
        return msgspec.structs.replace(policy, **given)


_key_limits = msgspec.json.Decoder(KeyLimits)


def _decoded(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """A JSON body, or a 400 naming the field that is wrong."""
    try:
        return decode(decoder, body)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        param = where.rstrip("`").lstrip(".")
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown is not None:  # msgspec places it at the object: name the field itself
            param = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
        raise InvalidRequest(message + ".", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None


_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`$")


def _limits(policy: Policy) -> dict[str, Any]:
    return {
        "rpm": policy.rpm,
        "tpm": policy.tpm,
        "max_concurrent": policy.max_concurrent,
        "credit_limit": policy.credit_limit,
        "reset": policy.reset,
    }


def key_view(key: ApiKey) -> dict[str, Any]:
    """A key as the API and `keys show --json` return it: everything but its secret."""
    models = key.policy.models
    return {
        "id": key.id,
        "name": key.name,
        "owner": key.owner,
        "status": key.status,
        "admin": key.admin,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "limits": _limits(key.policy),
        "models": None if models is None else sorted(models),
    }


async def _json(req: Request, status: int, payload: object) -> None:
    await send_bytes(req.send, status, _encode(payload), [(b"x-request-id", req.request_id.encode())])


# -- the caller's own view ------------------------------------------------------------------------


async def whoami(req: Request, ctx: Context) -> None:
    """GET /api/v1/key: the calling principal's limits, usage and remaining credit."""
    principal = await ctx.auth.principal(req.header(b"authorization"))
    status = await ctx.limiter.status(principal)
    spent = status.credit_spent
    if spent is None:  # no credit limit, so nothing counted: the ledger's total for all time
        spent = await ctx.ledger.spent(principal.id, 0.0)
    limit = principal.limits.credit_limit
    models = principal.limits.models
    await _json(
        req,
        200,
        {
            "data": {
                "id": principal.id,
                "kind": principal.kind,
                "name": principal.name,
                "owner": principal.owner,
                "admin": principal.admin,
                "expires_at": principal.expires_at,
                "models": None if models is None else sorted(models),
                "limits": _limits(principal.limits),
                "usage": status,
                "spent": spent,
                "limit_remaining": None if limit is None else max(0.0, limit - spent),
            }
        },
    )


async def generation(req: Request, ctx: Context) -> None:
    """GET /api/v1/generation?id=...: one past request's record, for whoever made it or an admin.
    Someone else's id is a 404, as if it did not exist."""
    principal = await ctx.auth.principal(req.header(b"authorization"))
    ids = parse_qs(req.query.decode("latin-1")).get("id")
    if not ids or not ids[0]:
        raise InvalidRequest("Give the request's id: /api/v1/generation?id=cmpl-...", param="id")
    if "\x00" in ids[0] or len(ids[0]) > 256:  # no such id can exist
        raise NotFound("No generation with this id.", param="id")
    record = await ctx.ledger.get(ids[0])
    if record is None or not (principal.admin or record.principal == principal.id):
        raise NotFound(f"No generation with id {quoted(ids[0])}.", param="id")
    fields = msgspec.to_builtins(record)
    await _json(req, 200, {"data": {"id": fields.pop("request_id"), **fields}})


# -- administration -------------------------------------------------------------------------------


async def key_collection(req: Request, ctx: Context) -> None:
    """GET /api/v1/keys (`?all=true` includes revoked keys) and POST /api/v1/keys."""
    await ctx.auth.admin(req.header(b"authorization"))
    if req.method == "GET":
        everything = parse_qs(req.query.decode("latin-1")).get("all", ["false"])[0] == "true"
        keys = await ctx.keys.list(include_revoked=everything)
        await _json(req, 200, {"data": [key_view(k) for k in keys]})
        return
    req.require_json()
    spec: KeySpec = _decoded(_key_spec, await req.body(_BODY_LIMIT))
    check_models(ctx, spec.models)
    try:
        key, secret = await ctx.keys.create(
            spec.name,
            owner=spec.owner,
            policy=spec.policy(),
            expires_at=spec.expires_at,
            admin=spec.admin,
        )
    except KeyNameTaken:
        raise Conflict(
            f"A live key named {quoted(spec.name)} exists already; revoke it first, or choose "
            "another name.",
            param="name",
        ) from None
    except KeyError_ as exc:
        message = str(exc)
        param = "owner" if "owner" in message else "expires_at" if "expiry" in message else "name"
        raise InvalidRequest(f"{message[0].upper()}{message[1:]}.", param=param) from None
    await _json(req, 201, {"data": key_view(key), "key": secret})


async def key_item(req: Request, ctx: Context) -> None:
    """GET /api/v1/keys/{id}, PATCH (its limits), DELETE (revoke), POST /api/v1/keys/{id}/rotate
    (the app routes only these methods here). A revoked key is gone from its URL, as after any
    DELETE; `GET /api/v1/keys?all=true` still lists it."""
    await ctx.auth.admin(req.header(b"authorization"))
    key_id = req.path.removeprefix("/api/v1/keys/").partition("/")[0]
    if "\x00" in key_id:
        raise NotFound("No live key with this id.", param="id")
    try:
        if req.method == "GET":
            await _json(req, 200, {"data": key_view(await ctx.keys.get(key_id))})
        elif req.method == "PATCH":
            req.require_json()
            limits: KeyLimits = _decoded(_key_limits, await req.body(_BODY_LIMIT))
            if isinstance(limits.models, list):
                check_models(ctx, limits.models)
            key = await ctx.keys.get(key_id)
            key = await ctx.keys.update(key.id, policy=limits.applied_to(key.policy))
            await _json(req, 200, {"data": key_view(key)})
        elif req.method == "DELETE":
            await _json(req, 200, {"data": key_view(await ctx.keys.revoke(key_id))})
        else:
            key, secret = await ctx.keys.rotate(key_id)
            await _json(req, 200, {"data": key_view(key), "key": secret})
    except KeyError_:
        raise NotFound(f"No live key with id {quoted(key_id)}.", param="id") from None


def check_models(ctx: Context, models: list[str] | None) -> None:
    for i, model in enumerate(models or ()):
        if model not in ctx.catalog.models:
            raise InvalidRequest(f"No model named {quoted(model)} on this router.", param=f"models[{i}]")
