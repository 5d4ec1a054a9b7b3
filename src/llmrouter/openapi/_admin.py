"""The operator's endpoints in the document: the config reload (api/admin.py, reload.py)."""

from __future__ import annotations

from typing import Any

from llmrouter.openapi._schema import RETRY_AFTER_HEADER, error, json_response, ref

__all__ = ["add_admin"]

Schema = dict[str, Any]


def _names(description: str) -> Schema:
    return {"type": "array", "items": {"type": "string"}, "description": description}


def _add_schemas(schemas: Schema) -> None:
    schemas["Reload"] = {
        "type": "object",
        "description": "What the reload changed (reload.Changes).",
        "required": ["status", "models", "providers", "settings"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["reloaded", "unchanged", "signalled"],
                "description": (
                    "`reloaded`: new requests get the new config; `unchanged`: the file says what "
                    "runs already; `signalled` (with `--workers`): the file was checked here and "
                    "every worker reloads it on its own."
                ),
            },
            "models": {
                "type": "object",
                "required": ["added", "removed", "changed"],
                "properties": {
                    "added": _names("Model ids."),
                    "removed": _names("Model ids (now a 404 model_not_found)."),
                    "changed": _names("Model ids whose settings or deployments changed."),
                },
            },
            "providers": {
                "type": "object",
                "required": ["rebuilt", "removed"],
                "properties": {
                    "rebuilt": _names(
                        "Providers new or changed, built and started anew; the others are kept "
                        "as they were (their connections, a local model loaded once)."
                    ),
                    "removed": _names("Providers closed once the requests using them end."),
                },
            },
            "settings": _names("The config's other sections that changed (`routing`...)."),
        },
    }


def add_admin(spec: Schema) -> None:
    _add_schemas(spec["components"]["schemas"])
    spec["paths"]["/admin/reload"] = {
        "post": {
            "operationId": "reload-config",
            "summary": "Re-read the config file (admin), as SIGHUP does",
            "description": (
                "Models, deployments, strategies, limits and provider keys change for new "
                "requests; requests in flight finish on the config they started with. A config "
                "that does not load, or that changes a field only a restart can, is refused with "
                "a 400 (`code: invalid_config`) saying why, and the running config stays."
            ),
            "tags": ["admin"],
            "responses": {
                "200": json_response(
                    "Reloaded",
                    {"type": "object", "required": ["data"], "properties": {"data": ref("Reload")}},
                ),
                "400": error(
                    "The config was refused (`code: invalid_config`; the message names the place), "
                    "or the Authorization header sent more than once"
                ),
                "401": error("Unauthorized - invalid API key or token"),
                "403": error("Not an admin key"),
                "503": error("The database cannot be reached", RETRY_AFTER_HEADER),
            },
        }
    }
