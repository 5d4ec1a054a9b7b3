"""`POST /chat/completions` as llmrouter serves it: OpenAI's Chat Completions, its schemas read off
the wire types that decode and encode it (wire/chat.py), so the document states exactly what
decoding refuses and what answers hold; the types it shares with /completions are the same
components."""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from llmrouter.openapi._schema import ref
from llmrouter.wire.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionCreateParams

__all__ = ["add_chat"]

Schema = dict[str, Any]

# Wire types both APIs decode or encode: their components in the document already.
_SHARED = {
    "ProviderPreferences": "ProviderPreferences",
    "StreamOptions": "CompletionCreateParamsStreamOptions",
    "ResponseFormatText": "CompletionCreateParamsResponseFormat0",
    "ResponseFormatJSONObject": "CompletionCreateParamsResponseFormat1",
    "ResponseFormatJSONSchema": "ResponseFormatJSONSchema",
    "JSONSchemaConfig": "JSONSchemaConfig",
    "ResponseFormatGrammar": "ResponseFormatTextGrammar",
    "ResponseFormatPython": "CompletionCreateParamsResponseFormat4",
    "Usage": "CompletionUsage",
}
_PREFIX = "#/components/schemas/"
# The answer's objects: a field with a default is always sent (only unset ones are left out).
_ANSWER = (
    "ChatCompletion",
    "ChatChoice",
    "ChatReply",
    "ChatLogprobs",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "ChatCompletionChunk",
    "ChatChunkChoice",
    "ChatFunctionDelta",
)


def add_chat(spec: Schema) -> None:
    schemas = spec["components"]["schemas"]
    _, generated = msgspec.json.schema_components(
        [ChatCompletionCreateParams, ChatCompletion, ChatCompletionChunk],
        ref_template=_PREFIX + "{name}",
    )
    names = {name: _SHARED.get(name) or _chat_name(name) for name in generated}
    for name, schema in generated.items():
        if name not in _SHARED:
            schema.pop("title", None)
            schemas[names[name]] = _renamed(schema, names)
    for name in _ANSWER:
        schema = schemas[name]
        present = [k for k, v in schema["properties"].items() if "default" in v]
        schema["required"] = [*schema.get("required", []), *present]
    _bound(schemas)
    _describe(schemas)
    completions = spec["paths"]["/completions"]["post"]
    responses = copy.deepcopy(completions["responses"])
    ok = responses["200"]
    ok["description"] = "The assistant's message (or, with `stream: true`, its deltas)"
    ok["content"]["application/json"]["schema"] = ref("ChatCompletion")
    item = ok["content"]["text/event-stream"]["itemSchema"]
    item["description"] = item["description"].replace(
        "a CompletionChunk: choices carry text deltas",
        "a ChatCompletionChunk: each choice's first delta carries `role`, then `content` deltas",
    )
    data = item["properties"]["data"]["else"]["contentSchema"]
    data["oneOf"][0] = ref("ChatCompletionChunk")
    spec["paths"]["/chat/completions"] = {
        "post": {
            "operationId": "create-chat-completion",
            "summary": "Create a chat completion",
            "description": (
                "OpenAI's Chat Completions, on the same road as /completions: the same keys, "
                "limits, ledger, routing (`model`, `models`, `provider`) and errors. Chat APIs "
                "take the conversation as it is; completions models through their chat template "
                "(a deployment without one is passed over)."
            ),
            "tags": ["chat"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref("ChatCompletionCreateParams")}},
            },
            "responses": responses,
        }
    }


def _chat_name(name: str) -> str:
    return name if name.startswith("Chat") else f"Chat{name}"


def _renamed(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_renamed(item, names) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _renamed(v, names) for k, v in node.items()}
    target = out.get("$ref")
    if isinstance(target, str) and target.startswith(_PREFIX):
        out["$ref"] = _PREFIX + names[target.removeprefix(_PREFIX)]
    if "mapping" in out and isinstance(out["mapping"], dict):
        out["mapping"] = {k: _PREFIX + names[v.removeprefix(_PREFIX)] for k, v in out["mapping"].items()}
    return out


def _bound(schemas: Schema) -> None:
    """What the router refuses with a 400 and msgspec's schema cannot say (wire/validate.py's
    rules), as on /completions: the same components and keywords where the field is the same."""
    request = schemas["ChatCompletionCreateParams"]
    params = request["properties"]
    completions = schemas["CompletionCreateParams"]["properties"]
    params["model"] = ref("ModelName")
    params["models"]["items"] = ref("ModelName")
    for name in ("logit_bias", "metadata", "user"):
        params[name] = copy.deepcopy(completions[name])
    for branch in params["stop"]["anyOf"]:
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch["items"]["minLength"] = 1
    present = {"not": {"type": "null"}}
    request["allOf"] = [
        {  # stream_options only with stream
            "if": {"required": ["stream_options"], "properties": {"stream_options": present}},
            "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
        },
        {  # top_logprobs only with logprobs
            "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": present}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        },
        {  # one name of the output cap
            "not": {
                "required": ["max_tokens", "max_completion_tokens"],
                "properties": {"max_tokens": present, "max_completion_tokens": present},
            }
        },
        *(
            {  # only with tools
                "if": {"required": [name], "properties": {name: present}},
                "then": {
                    "required": ["tools"],
                    "properties": {"tools": {"type": "array", "minItems": 1}},
                },
            }
            for name in ("tool_choice", "parallel_tool_calls")
        ),
    ]


def _describe(schemas: Schema) -> None:
    """Rules between fields (a 400 naming the field), and what the router adds to OpenAI's."""
    params = schemas["ChatCompletionCreateParams"]["properties"]
    params["top_logprobs"]["description"] = "Needs `logprobs: true`."
    params["max_tokens"]["description"] = (
        "The older name of `max_completion_tokens`: set one, not both. Neither: up to the "
        "model's context."
    )
    params["tool_choice"]["description"] = "Only with `tools`."
    params["parallel_tool_calls"]["description"] = "Only with `tools`."
    params["messages"]["description"] = (
        "A `tool` message must answer a tool call of an earlier assistant message."
    )
    params["models"]["description"] = "Fallback models, tried in order after `model`."
    params["user"]["description"] = "An identifier of the end user, kept in the ledger."
    reply = schemas["ChatReply"]["properties"]
    reply["reasoning"]["description"] = "The model's thinking, where it shows it (OpenRouter's)."
    choice = schemas["ChatChoice"]["properties"]
    choice["native_finish_reason"]["description"] = "The finish reason as the provider gave it."
