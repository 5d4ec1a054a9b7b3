"""Decode a request body once into typed values, or fail with a 400 that names the field.

msgspec checks types, nullability and ranges while decoding; its error path (`$.prompt[2]`) becomes
the error's `param` (`prompt[2]`). The rules that span several fields follow.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, TypeVar, cast

import msgspec

from llmrouter.errors import QUOTED_CHARS, InvalidRequest, clipped, quoted
from llmrouter.wire.chat import (
    AssistantMessage,
    ChatCompletionCreateParams,
    ToolMessage,
    chat_request_decoder,
)
from llmrouter.wire.completions import CompletionCreateParams, request_decoder
from llmrouter.wire.decode import decode

__all__ = [
    "MAX_BIAS",
    "METADATA_KEY_CHARS",
    "METADATA_PAIRS",
    "METADATA_VALUE_CHARS",
    "TOKEN_ID",
    "Prompts",
    "check_shared",
    "decode_body",
    "decode_chat_request",
    "decode_completion_request",
]

T = TypeVar("T")

# A validated prompt: a batch of strings, or a batch of token-id sequences (never a mixture).
Prompts = tuple[str, ...] | tuple[tuple[int, ...], ...]

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`")
# A value msgspec quotes back ("Invalid enum value 'ZZZ...'"), long enough to need cutting.
_QUOTE_IN_MESSAGE = re.compile(rf"'([^']{{{QUOTED_CHARS + 1},}})'")
# The bounds below are public because the served OpenAPI document states them (openapi/).
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() accepts "²" and "١"
MAX_BIAS = 100  # a logit_bias value is from -MAX_BIAS to MAX_BIAS
METADATA_PAIRS = 16
METADATA_KEY_CHARS = 64
METADATA_VALUE_CHARS = 512


def _param_of(path: str) -> str:
    """`$.models[1]` -> `models[1]`; `$` -> ``; a map's value (`logit_bias[...]`) -> the map."""
    return path.lstrip(".").split("[...]", 1)[0]


def decode_completion_request(body: bytes) -> tuple[CompletionCreateParams, Prompts]:
    params = decode_body(request_decoder, body)
    prompts = _check_prompt(params.prompt)
    _check_cross_field(params)
    return params, prompts


def decode_chat_request(body: bytes) -> ChatCompletionCreateParams:
    """A chat request decoded and held to the rules that span its fields (OpenAI's)."""
    params = decode_body(chat_request_decoder, body)
    check_shared(params)
    if params.top_logprobs is not None and not params.logprobs:
        raise InvalidRequest("`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
    if params.max_tokens is not None and params.max_completion_tokens is not None:
        raise InvalidRequest(
            "Set `max_completion_tokens` or `max_tokens` (its older name), not both.",
            param="max_tokens",
        )
    if not params.tools:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(params, name) is not None:
                raise InvalidRequest(f"`{name}` is only allowed with `tools`.", param=name)
    called: set[str] = set()
    for i, message in enumerate(params.messages):
        if isinstance(message, AssistantMessage) and message.tool_calls:
            called.update(call.id for call in message.tool_calls)
        elif isinstance(message, ToolMessage) and message.tool_call_id not in called:
            raise InvalidRequest(
                f"A `tool` message must answer a tool call of an earlier assistant message; "
                f"{quoted(message.tool_call_id)} is none.",
                param=f"messages[{i}].tool_call_id",
            )
    return params


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """A request body decoded into its type, or a 400 naming the field that is wrong."""
    try:
        return decode(decoder, body)
    except msgspec.ValidationError as exc:
        raise _translate(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None


def _translate(message: str) -> InvalidRequest:
    message = _QUOTE_IN_MESSAGE.sub(lambda m: quoted(m.group(1)), message)
    match = _PATH.search(message)
    path = _param_of(match.group("path")) if match else ""
    text = message[: match.start()] if match else message
    unknown = _UNKNOWN.match(text)
    if unknown:
        field = clipped(f"{path}.{unknown.group('field')}" if path else unknown.group("field"))
        return InvalidRequest(
            f"Unrecognized request argument supplied: {field}",
            param=field,
            code="unknown_parameter",
        )
    if text.startswith("Object missing required field"):
        return InvalidRequest(f"{text}.", param=_missing_field(text, path), code="missing_field")
    if text.startswith("Expected `object`, got") and not path:
        return InvalidRequest(f"The request body must be a JSON object: {text}.", code="invalid_json")
    where = f" for `{path}`" if path else ""
    return InvalidRequest(f"Invalid value{where}: {text}.", param=path, code="invalid_type")


def _missing_field(text: str, path: str) -> str:
    field = text.split("`")[1] if "`" in text else ""
    return f"{path}.{field}" if path else field


def _check_prompt(prompt: str | list[str | int | list[int]]) -> Prompts:
    if isinstance(prompt, str):
        return (prompt,)
    if not prompt:
        raise InvalidRequest("`prompt` must not be an empty list.", param="prompt")
    first = prompt[0]
    if isinstance(first, str):
        kind: type = str
    elif isinstance(first, int):
        kind = int
    else:
        kind = list
    for i, item in enumerate(prompt):
        if not isinstance(item, kind):
            raise InvalidRequest(
                "`prompt` must be a string, an array of strings, an array of token ids, or an "
                f"array of token-id arrays; element {i} does not match element 0.",
                param=f"prompt[{i}]",
            )
        if kind is list and not item:
            raise InvalidRequest("A token-id prompt must not be empty.", param=f"prompt[{i}]")
    if kind is str:
        return tuple(cast(list[str], prompt))
    if kind is int:
        return (tuple(cast(list[int], prompt)),)
    return tuple(tuple(item) for item in cast(list[list[int]], prompt))


def _check_cross_field(params: CompletionCreateParams) -> None:
    n = params.n or 1
    if params.best_of is not None and params.best_of < n:
        raise InvalidRequest(
            f"`best_of` ({params.best_of}) must be greater than or equal to `n` ({n}).",
            param="best_of",
        )
    if params.stream and params.best_of is not None and params.best_of > n:
        raise InvalidRequest(
            "`best_of` greater than `n` cannot be streamed: the best choices are known only at the end.",
            param="best_of",
        )
    check_shared(params)


class _Shared(Protocol):
    """The fields every generation API of the router has, checked alike."""

    @property
    def stream(self) -> bool: ...

    @property
    def stream_options(self) -> object | None: ...

    @property
    def stop(self) -> str | list[str] | None: ...

    @property
    def logit_bias(self) -> dict[str, Any] | None: ...

    @property
    def metadata(self) -> dict[str, Any] | None: ...

    @property
    def model(self) -> str | msgspec.UnsetType: ...

    @property
    def models(self) -> list[str] | msgspec.UnsetType: ...


def check_shared(params: _Shared) -> None:
    """The rules that span fields of every generation request (/completions and the chat
    endpoint alike): stream options, stop sequences, logit_bias, metadata, model names."""
    if params.stream_options is not None and not params.stream:
        raise InvalidRequest(
            "`stream_options` is only allowed when `stream` is true.", param="stream_options"
        )
    stops = [params.stop] if isinstance(params.stop, str) else params.stop or []
    for i, stop in enumerate(stops):
        if not stop:
            where = "stop" if isinstance(params.stop, str) else f"stop[{i}]"
            raise InvalidRequest("A stop sequence must not be empty.", param=where)
    for key, bias in (params.logit_bias or {}).items():
        if not TOKEN_ID.fullmatch(key):
            raise InvalidRequest(
                f"`logit_bias` keys must be token ids (non-negative integers); got {quoted(key)}.",
                param=f"logit_bias.{clipped(key)}",
            )
        if (
            isinstance(bias, bool)
            or not isinstance(bias, int | float)
            or not -MAX_BIAS <= bias <= MAX_BIAS
        ):
            raise InvalidRequest(
                f"`logit_bias` values must be numbers from -{MAX_BIAS} to {MAX_BIAS}; "
                f"got {quoted(repr(bias))}.",
                param=f"logit_bias.{key}",
            )
    if params.metadata is not None:
        _check_metadata(params.metadata)
    if params.models is not msgspec.UNSET:
        for i, model in enumerate(params.models):
            if not model:
                raise InvalidRequest("Model ids must not be empty.", param=f"models[{i}]")
    if params.model is not msgspec.UNSET and not params.model:
        raise InvalidRequest("`model` must not be empty.", param="model")


def _check_metadata(metadata: dict[str, object]) -> None:
    if len(metadata) > METADATA_PAIRS:
        raise InvalidRequest(
            f"`metadata` holds at most {METADATA_PAIRS} pairs; got {len(metadata)}.",
            param="metadata",
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidRequest("`metadata` values must be strings.", param=f"metadata.{clipped(key)}")
        if len(key) > METADATA_KEY_CHARS:
            raise InvalidRequest(
                f"`metadata` keys are at most {METADATA_KEY_CHARS} characters.",
                param=f"metadata.{clipped(key)}",
            )
        if len(value) > METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"`metadata` values are at most {METADATA_VALUE_CHARS} characters.",
                param=f"metadata.{key}",
            )
