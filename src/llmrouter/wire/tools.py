"""Tools (function calling) on the wire, in OpenAI's format: what a chat request declares and
answers, and what an answer (and a stream's delta) calls. Shared by the chat wire and the choices
every adapter returns; the Completions API never has tools, so its answers never carry a call."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = [
    "FunctionCall",
    "FunctionDefinition",
    "FunctionDelta",
    "NamedFunction",
    "NamedToolChoice",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "function_fields",
]

ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(Struct, forbid_unknown_fields=True):
    name: ToolName
    arguments: str  # JSON text, as the model wrote it


class ToolCall(Struct, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, Meta(min_length=1)]
    type: Literal["function"] = "function"
    function: FunctionCall
    # Accepted in a request and not passed on: the openai SDK's stream helper leaves each call's
    # delta index in the message it assembles, which clients send back as it is.
    index: int | UnsetType = UNSET


class FunctionDefinition(Struct, forbid_unknown_fields=True):
    name: ToolName
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET  # JSON Schema
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct, forbid_unknown_fields=True):
    name: ToolName


class NamedToolChoice(Struct, forbid_unknown_fields=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionDelta(Struct):
    name: str | UnsetType = UNSET  # in a call's first delta
    arguments: str = ""


class ToolCallDelta(Struct, omit_defaults=True):
    """A piece of a streamed call: its first has `id`, `type` and the function's `name`; the
    arguments' text follows in pieces, all keyed by `index` (the call's place in the message)."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionDelta | UnsetType = UNSET


def function_fields(tool: FunctionDefinition) -> dict[str, Any]:
    """A declared function's fields that are set (OpenAI's names; other APIs rename them)."""
    fields: dict[str, Any] = {"name": tool.name}
    if tool.description is not UNSET:
        fields["description"] = tool.description
    if tool.parameters is not UNSET:
        fields["parameters"] = tool.parameters
    if tool.strict is not None:
        fields["strict"] = tool.strict
    return fields
