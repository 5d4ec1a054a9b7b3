"""The accounts endpoints in the document: the caller's key, a past generation, key administration
(api/accounts.py), with the bounds KeySpec and check_label enforce."""

from __future__ import annotations

from typing import Any

from llmrouter.accounts.keys import MAX_LABEL
from llmrouter.api.accounts import KeyLimits, KeySpec
from llmrouter.openapi._schema import RETRY_AFTER_HEADER, constrain, error, json_response, ref

__all__ = ["add_accounts", "label_pattern"]

Schema = dict[str, Any]

# What `str.strip()` strips: every character Python calls whitespace is below U+3001
# (tests/unit/test_docs.py checks it for all of Unicode).
_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def label_pattern() -> str:
    """A key's name or owner as check_label takes it: no NUL, and not only whitespace (Python's
    whitespace, spelled out, since a schema's `\\s` is ECMAScript's, which is another set)."""
    spaces = "".join(f"\\u{ord(c):04x}" for c in _WHITESPACE)
    return f"^[^\\u0000]*[^\\u0000{spaces}][^\\u0000]*$"


def _label(description: str, *, nullable: bool = False) -> Schema:
    label: Schema = {
        "type": "string",
        "maxLength": MAX_LABEL,
        "pattern": label_pattern(),
        "description": description,
    }
    return {**label, "nullable": True} if nullable else label


def _add_schemas(schemas: Schema) -> None:
    nullable_int = {"type": "integer", "nullable": True}
    reset = {"type": "string", "enum": ["daily", "weekly", "monthly"], "nullable": True}
    models = {"type": "array", "items": {"type": "string"}, "nullable": True}
    limits = {
        "rpm": nullable_int,
        "tpm": nullable_int,
        "max_concurrent": nullable_int,
        "credit_limit": {"type": "number", "nullable": True},
        "reset": reset,
    }
    schemas["Limits"] = {"type": "object", "description": "null: no such limit.", "properties": limits}
    schemas["Key"] = {
        "type": "object",
        "required": ["id", "name", "status", "admin", "created_at", "limits"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "owner": {"type": "string", "nullable": True},
            "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
            "admin": {"type": "boolean"},
            "created_at": {"type": "integer"},
            "expires_at": nullable_int,
            "revoked_at": nullable_int,
            "limits": ref("Limits"),
            "models": models,
        },
    }
    schemas["KeyCreate"] = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": _label("Unique among live keys (a 409 if a live key has it)."),
            "owner": _label("Whom the key is for.", nullable=True),
            **{name: dict(schema) for name, schema in limits.items()},
            "models": {
                **models,
                "description": "The models it may use, each a model of this router (else a 400).",
            },
            "expires_at": {
                **nullable_int,
                "description": "Unix seconds, in the future (else a 400).",
            },
            "admin": {"type": "boolean"},
        },
    }
    constrain(schemas["KeyCreate"], KeySpec)
    schemas["KeyLimits"] = {
        "type": "object",
        "additionalProperties": False,
        "description": "A field left out stays as it is; null is unlimited (`models`: every model).",
        "properties": {
            **{name: dict(schema) for name, schema in limits.items()},
            "models": {
                **models,
                "description": "The models it may use, each a model of this router (else a 400).",
            },
        },
    }
    constrain(schemas["KeyLimits"], KeyLimits)
    schemas["Generation"] = {
        "type": "object",
        "description": "One request's ledger record.",
        "properties": {
            name: {"type": kind, "nullable": True}
            for name, kind in (
                ("id", "string"),
                ("principal", "string"),
                ("user", "string"),
                ("model_requested", "string"),
                ("model", "string"),
                ("provider", "string"),
                ("prompt_tokens", "integer"),
                ("completion_tokens", "integer"),
                ("cost", "number"),
                ("latency_ms", "number"),
                ("ttft_ms", "number"),
                ("status", "integer"),
                ("error", "string"),
                ("finish_reason", "string"),
                ("stream", "boolean"),
                ("created_at", "number"),
                ("finished_at", "number"),
            )
        }
        | {
            "metadata": {
                "type": "object",
                "nullable": True,
                "additionalProperties": {"type": "string"},
            },
            "attempts": {"type": "array", "items": {"type": "string"}},
        },
    }
    schemas["Caller"] = {
        "type": "object",
        "required": ["id", "kind", "name", "admin", "limits", "usage", "spent"],
        "properties": {
            "id": {"type": "string", "description": "`key:<key id>` or `jwt:<issuer> <subject>`"},
            "kind": {"type": "string", "enum": ["key", "jwt"]},
            "name": {"type": "string"},
            "owner": {"type": "string", "nullable": True},
            "admin": {"type": "boolean"},
            "expires_at": nullable_int,
            "models": models,
            "limits": ref("Limits"),
            "usage": {
                "type": "object",
                "description": "Where the caller stands; null where it has no such limit.",
                "properties": {
                    "requests": nullable_int,
                    "tokens": nullable_int,
                    "concurrent": nullable_int,
                    "credit_spent": {"type": "number", "nullable": True},
                    "period_start": {"type": "integer"},
                    "period_end": nullable_int,
                },
            },
            "spent": {"type": "number"},
            "limit_remaining": {"type": "number", "nullable": True},
        },
    }


def _data(schema: Schema) -> Schema:
    return {"type": "object", "required": ["data"], "properties": {"data": schema}}


def _key_and_secret() -> Schema:
    return {
        "type": "object",
        "required": ["data", "key"],
        "properties": {
            "data": ref("Key"),
            "key": {"type": "string", "description": "The secret; shown only here."},
        },
    }


def add_accounts(spec: Schema) -> None:
    _add_schemas(spec["components"]["schemas"])
    common = {
        "400": error("The Authorization header sent more than once"),
        "401": error("Unauthorized - invalid API key or token"),
        "503": error("The database cannot be reached", RETRY_AFTER_HEADER),
    }
    admin = {**common, "403": error("Not an admin key")}
    key_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    one_key = json_response("The key", _data(ref("Key")))
    no_key = error("No live key with this id (a revoked key is gone from its URL)")
    paths = spec["paths"]
    paths["/key"] = {
        "get": {
            "operationId": "get-key",
            "summary": "The calling key's or token's limits, usage and remaining credit",
            "tags": ["accounts"],
            "responses": {"200": json_response("The caller", _data(ref("Caller"))), **common},
        }
    }
    paths["/generation"] = {
        "get": {
            "operationId": "get-generation",
            "summary": "One past request's record: for the key or token that made it, or an admin",
            "tags": ["accounts"],
            "parameters": [
                {
                    "name": "id",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                    "description": "The request's id (X-Request-Id, or a completion's `id`).",
                }
            ],
            "responses": {
                "200": json_response("The record", _data(ref("Generation"))),
                **common,
                "400": error("No id given, or the Authorization header sent more than once"),
                "404": error("No such generation for this caller"),
            },
        }
    }
    paths["/keys"] = {
        "get": {
            "operationId": "list-keys",
            "summary": "List keys (admin)",
            "tags": ["accounts"],
            "parameters": [
                {
                    "name": "all",
                    "in": "query",
                    "schema": {"type": "string"},
                    "description": "`true`: revoked keys too; any other value: live keys only.",
                }
            ],
            "responses": {
                "200": json_response("The keys", _data({"type": "array", "items": ref("Key")})),
                **admin,
            },
        },
        "post": {
            "operationId": "create-key",
            "summary": "Create a key (admin); its secret is in the answer, once",
            "tags": ["accounts"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("KeyCreate")}},
            },
            "responses": {
                "201": json_response("The new key", _key_and_secret()),
                **admin,
                "400": error("Bad body, or the Authorization header sent more than once"),
                "409": error("A live key has this name already (`code: conflict`, `param: name`)"),
                "413": error("Body over 1 MiB"),
                "415": error("Body not sent as application/json"),
            },
        },
    }
    paths["/keys/{id}"] = {
        "get": {
            "operationId": "get-key-by-id",
            "summary": "One live key (admin), by id or name",
            "tags": ["accounts"],
            "parameters": key_id,
            "responses": {"200": one_key, **admin, "404": no_key},
        },
        "patch": {
            "operationId": "update-key",
            "summary": "New limits for a live key (admin), in force at once",
            "tags": ["accounts"],
            "parameters": key_id,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("KeyLimits")}},
            },
            "responses": {
                "200": one_key,
                **admin,
                "400": error("Bad body, or the Authorization header sent more than once"),
                "404": no_key,
                "413": error("Body over 1 MiB"),
                "415": error("Body not sent as application/json"),
            },
        },
        "delete": {
            "operationId": "revoke-key",
            "summary": "Revoke a key (admin); `GET /keys?all=true` still lists it",
            "tags": ["accounts"],
            "parameters": key_id,
            "responses": {"200": one_key, **admin, "404": no_key},
        },
    }
    paths["/keys/{id}/rotate"] = {
        "post": {
            "operationId": "rotate-key",
            "summary": "A new secret for a key, same id and limits (admin); the old one stops working",
            "tags": ["accounts"],
            "parameters": key_id,
            "responses": {
                "200": json_response("The key and its new secret", _key_and_secret()),
                **admin,
                "404": no_key,
            },
        }
    }
