"""Decoding a body into its wire type, where a whole number written with a fraction (`2.0`, `1e3`)
is an integer.

JSON has one kind of number, and JSON Schema 2020-12 (the served OpenAPI document's) counts `2.0`
as the integer 2; msgspec refuses it for an `int` field. A body refused that way is decoded again
with its whole floats as integers. Only then: a body that decodes at once pays nothing.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

__all__ = ["decode"]

T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """`body` as the decoder's type, its whole floats counted as integers. Raises what msgspec
    raises: the refusal of the second decoding if there was one, else the first's."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as refusal:
        try:
            value = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            raise refusal from None
    converted: T = msgspec.convert(_whole_floats_as_ints(value), decoder.type)
    return converted


def _whole_floats_as_ints(value: Any) -> Any:
    """The same value, whole floats replaced by integers, in place; a loop, not a recursion,
    since the body's nesting is the client's."""
    if not isinstance(value, dict | list):
        return _as_int(value)
    pending: list[dict[str, Any] | list[Any]] = [value]
    while pending:
        container = pending.pop()
        if isinstance(container, dict):
            for key, item in container.items():
                container[key] = _visit(item, pending)
        else:
            for i, item in enumerate(container):
                container[i] = _visit(item, pending)
    return value


def _visit(item: Any, pending: list[dict[str, Any] | list[Any]]) -> Any:
    if isinstance(item, dict | list):
        pending.append(item)
        return item
    return _as_int(item)


def _as_int(item: Any) -> Any:
    return int(item) if isinstance(item, float) and item.is_integer() else item
