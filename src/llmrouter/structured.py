"""Structured output: what each `response_format` demands of the text, checked by the router.

Every deployment's answer is checked here, whether the deployment constrained its decoding or not:
a choice that ended by itself (`finish_reason: stop`) must satisfy the format, or the attempt fails
with `InvalidOutput` and the executor asks again (then the next model). A choice cut short by
`max_tokens` is returned as it is, as OpenAI does: the client's own limit cut it.

Schemas, grammars and answers are the client's and the model's, and the checks are Python: each is
bounded by `checks:` in the config (`CheckSettings`). At the edge a schema's nesting and size, its
patterns' nesting, and a grammar's nesting, size and expanded rules are counted before anything
recurses over them (a 400 naming the limit); the check of one answer has one time budget, shared by
every pattern in it (past it the answer is invalid). `Checks` runs what may take long in a small pool
of threads, so the event loop never waits for a check: `Checks.admit` at the edge, `Checker.check`
for answers.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypeVar

import msgspec
import regex

from llmrouter.errors import InvalidRequest
from llmrouter.providers import _grammar
from llmrouter.providers._grammar import check_grammar
from llmrouter.settings import CheckSettings
from llmrouter.wire.completions import (
    ResponseFormat,
    ResponseFormatGrammar,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatPython,
)

__all__ = [
    "Checker",
    "Checks",
    "check_request_format",
    "checker_for",
    "format_kind",
    "gbnf_for",
    "guidance_for",
]

T = TypeVar("T")

_SCHEMA_PARAM = "response_format.json_schema.schema"
_DEFAULT_LIMITS = CheckSettings()

# An answer this short is checked on the event loop first, for this long at most: most answers are
# a few hundred characters checked in microseconds, and a thread hop (~50 us, and a wake-up of the
# loop) would cost more than the check. One that is longer, or outlasts the slice (a pattern that
# backtracks), is checked again from the start in the pool, with what is left of its budget: the
# slice is the most the loop ever gives a check, and the most work ever done twice.
_INLINE_CHARS = 4096
_INLINE_SECONDS = 0.002
# A schema with at most this many values is measured on the event loop (a few hundred microseconds)
# and, once its validator is built, found in the cache there: the common case, a schema a client
# sends again and again, pays no thread hop. Anything else is done in the pool.
_INLINE_NODES = 2048
_INLINE_CHARS_OF_SCHEMA = 64 * 1024
# Threads for checks: few, since a check in Python holds the GIL and each one that runs takes turns
# with the loop; `regex` lets go of it while it matches.
_WORKERS = 2


class _OutOfTime(Exception):
    """The check of an answer has used its time (or its slice of it on the event loop)."""


# When the answer being checked in this thread must be done: set by `_within` around one check.
_deadline: ContextVar[float] = ContextVar("llmrouter_check_deadline", default=math.inf)


def _within(verdict: Callable[[str], str | None], text: str, seconds: float) -> str | None:
    """`verdict(text)`, raising _OutOfTime once `seconds` have passed."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        return verdict(text)
    finally:
        _deadline.reset(token)


def _left() -> float:
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise _OutOfTime
    return left


@dataclass(frozen=True, slots=True)
class Checker:
    """The check of answers against one format: what is wrong with a text, or None when it
    satisfies the format. The check of one answer has `seconds` in all (every pattern in it shares
    them); an answer not found valid in that time is not valid."""

    verdict: Callable[[str], str | None]
    seconds: float
    pool: Executor | None = None  # where long checks run (None: asyncio's default executor)

    def __call__(self, text: str) -> str | None:
        """The check, in this thread."""
        try:
            return _within(self.verdict, text, self.seconds)
        except _OutOfTime:
            return self._ran_out()

    async def check(self, text: str) -> str | None:
        """The check, without holding up the event loop: a short answer for a slice of the budget
        on the loop, else (or if that was not enough) in the pool (see _INLINE_SECONDS)."""
        started = time.monotonic()
        if len(text) <= _INLINE_CHARS:
            try:
                return _within(self.verdict, text, min(_INLINE_SECONDS, self.seconds))
            except _OutOfTime:
                pass
        left = self.seconds - (time.monotonic() - started)
        if left <= 0:
            return self._ran_out()
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._in_pool, text, left)

    def _in_pool(self, text: str, seconds: float) -> str | None:
        try:
            return _within(self.verdict, text, seconds)
        except _OutOfTime:
            return self._ran_out()

    def _ran_out(self) -> str:
        return f"its check ran out of time (checks.answer_seconds: {self.seconds:g} s)"


class Checks:
    """The checks as the router runs them: within `settings`, and whatever may take long in a small
    pool of threads of its own (not asyncio's default executor, which resolves host names)."""

    def __init__(self, settings: CheckSettings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="llmrouter-check")

    async def admit(self, response_format: ResponseFormat | None) -> Checker | None:
        """At the edge: a schema that is not a valid JSON Schema, or a grammar that does not parse,
        is the client's error (400), whichever deployment would have answered; so is one beyond
        the limits. Returns the check of the answers (None: nothing to check)."""
        limits = self.settings
        if isinstance(response_format, ResponseFormatJSONSchema):
            schema = response_format.json_schema.schema
            if schema is not msgspec.UNSET:
                frozen = _frozen_here(schema, limits)
                validator = None if frozen is None else _VALIDATORS.get((frozen, limits))
                if validator is None:
                    validator = await self._off_loop(_schema_validator, schema, limits)
                return Checker(partial(_json_schema, validator), limits.answer_seconds, self._pool)
        elif isinstance(response_format, ResponseFormatGrammar):
            # Always in the pool: a grammar's cost is not its length (`"a"{0,2000}` is 2,000 rules
            # in 11 characters), and a request decoded under a grammar takes far longer than a hop.
            await self._off_loop(_check_client_grammar, response_format.grammar, limits)
            return None
        return checker_for(response_format, limits, self._pool)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def format_kind(response_format: ResponseFormat | None) -> str:
    """The format's `type`: "text" when there is none."""
    if response_format is None:
        return "text"
    return str(response_format.__struct_config__.tag)


def check_request_format(
    response_format: ResponseFormat | None, limits: CheckSettings = _DEFAULT_LIMITS
) -> None:
    """`Checks.admit`'s refusals, in this thread."""
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        if schema is msgspec.UNSET:
            return
        _schema_validator(schema, limits)  # raises InvalidRequest
    elif isinstance(response_format, ResponseFormatGrammar):
        _check_client_grammar(response_format.grammar, limits)


def _check_client_grammar(grammar: str, limits: CheckSettings) -> None:
    check_grammar(
        grammar,
        max_bytes=limits.grammar_bytes,
        max_depth=limits.grammar_depth,
        max_rules=limits.grammar_rules,
    )


def gbnf_for(response_format: ResponseFormat | None, limits: CheckSettings = _DEFAULT_LIMITS) -> str:
    """A constrained format as a GBNF grammar, for engines that decode under one (llama.cpp); one
    made from a schema is held to the grammar limits too. It may take a while for a large schema
    (then it is cached): call it off the event loop."""
    if isinstance(response_format, ResponseFormatJSONObject):
        return _grammar.json_object_grammar()
    if isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        return _schema_grammar("{}" if schema is msgspec.UNSET else _freeze(schema), limits)
    if isinstance(response_format, ResponseFormatGrammar):
        return response_format.grammar
    raise ValueError(f"no grammar for response_format {format_kind(response_format)!r}")


def guidance_for(response_format: ResponseFormat | None) -> str | None:
    """A JSON Schema as an llguidance grammar, when llguidance is installed and implements every
    keyword the schema uses (else None: llama.cpp's grammar, and the check, do the work)."""
    if not isinstance(response_format, ResponseFormatJSONSchema):
        return None
    schema = response_format.json_schema.schema
    return _guidance_grammar("{}" if schema is msgspec.UNSET else _freeze(schema))


@lru_cache(maxsize=256)
def _guidance_grammar(frozen: str) -> str | None:
    try:
        from llguidance import LLMatcher
    except ImportError:
        return None
    # Separators as json.dumps writes them, and no other whitespace: a small model left free to
    # indent can indent for ever.
    try:
        grammar = LLMatcher.grammar_from_json_schema(
            frozen,
            overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        )
    except ValueError:  # e.g. "recursion limit exceeded": its JSON parser stops at 128 levels
        return None
    is_error, _ = LLMatcher.validate_grammar_with_warnings(grammar)
    return None if is_error else str(grammar)


@lru_cache(maxsize=256)
def _schema_grammar(frozen: str, limits: CheckSettings) -> str:
    return _grammar.json_schema_grammar(
        _bounded_integers(json.loads(frozen)),
        max_bytes=limits.grammar_bytes,
        max_depth=limits.grammar_depth,
        max_rules=limits.grammar_rules,
    )


_ENUMERABLE = 1024


def _bounded_integers(node: Any) -> Any:
    """llama-cpp-python's converter ignores an integer's minimum and maximum; a range small enough
    is written out as an enum, which it does constrain. (Larger ranges are checked afterwards.)"""
    if isinstance(node, list):
        return [_bounded_integers(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_integers(v) for k, v in node.items()}
    low, high = out.get("minimum"), out.get("maximum")
    if (
        out.get("type") == "integer"
        and isinstance(low, int)
        and isinstance(high, int)
        and 0 <= high - low < _ENUMERABLE
        and not {"enum", "const", "multipleOf", "exclusiveMinimum", "exclusiveMaximum"} & out.keys()
    ):
        return {"enum": list(range(low, high + 1))}
    return out


def checker_for(
    response_format: ResponseFormat | None,
    limits: CheckSettings = _DEFAULT_LIMITS,
    pool: Executor | None = None,
) -> Checker | None:
    """The check for a format; None for free text and for grammars (which only a deployment that
    decodes under the grammar honours, so there is nothing to check afterwards). A schema's is
    built here, in this thread (`Checks.admit` builds it off the event loop)."""
    verdict: Callable[[str], str | None]
    if isinstance(response_format, ResponseFormatJSONObject):
        verdict = _json_object
    elif isinstance(response_format, ResponseFormatJSONSchema):
        schema = response_format.json_schema.schema
        if schema is msgspec.UNSET:
            verdict = _json_any
        else:
            verdict = partial(_json_schema, _schema_validator(schema, limits))
    elif isinstance(response_format, ResponseFormatPython):
        verdict = _python
    else:
        return None
    return Checker(verdict, limits.answer_seconds, pool)


def _json_object(text: str) -> str | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _json_any(text: str) -> str | None:
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    return None


def _json_schema(validator: Any, text: str) -> str | None:
    import jsonschema
    import referencing.exceptions

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    try:
        # The first error, not the best of all: finding every error visits every value (and runs
        # every pattern). best_match still picks the likeliest cause inside an anyOf or oneOf.
        error = jsonschema.exceptions.best_match(itertools.islice(validator.iter_errors(value), 1))
    except RecursionError:
        return "nested too deeply to check"
    except referencing.exceptions.Unresolvable as exc:  # never fetched: no network from schemas
        raise InvalidRequest(
            f"`response_format.json_schema.schema` has a reference that cannot be resolved: {exc}",
            param="response_format.json_schema.schema",
        ) from None
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the document"
    return f"at {where}: {error.message}"[:500]


def _python(text: str) -> str | None:
    try:
        with warnings.catch_warnings():  # invalid escapes etc. warn; only syntax matters here
            warnings.simplefilter("ignore")
            ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return f"not valid Python: {type(exc).__name__}: {exc}"
    return None


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every object in a schema, the schema itself first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from _objects(item)


def _check_inside(schema: dict[str, Any]) -> None:
    """Every `$ref` resolves inside the schema (a reference elsewhere would be a request from the
    router to wherever the client likes: the registry is empty and retrieves nothing)."""
    import referencing
    import referencing.exceptions
    import referencing.jsonschema

    root = referencing.Resource.from_contents(schema, referencing.jsonschema.DRAFT202012)
    resolver = referencing.Registry().resolver_with_root(root)
    for node in _objects(schema):
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except referencing.exceptions.Unresolvable:
                raise InvalidRequest(
                    f"`$ref` {ref[:100]!r} does not point inside the schema; llmrouter resolves "
                    "references only within the schema itself (`#/$defs/...`).",
                    param=_SCHEMA_PARAM,
                ) from None


def _check_patterns(schema: dict[str, Any], limits: CheckSettings) -> None:
    """Every pattern is a regular expression, its groups nested within the limit (the parsers of
    `re` and `regex` recurse once a group)."""
    for node in _objects(schema):
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            if _group_depth(pattern) > limits.schema_depth:
                raise InvalidRequest(
                    "`response_format.json_schema.schema` has a pattern whose groups nest more "
                    f"than {limits.schema_depth} deep (llmrouter's limit, checks.schema_depth): "
                    f"{pattern[:80]!r}",
                    param=_SCHEMA_PARAM,
                )
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise InvalidRequest(
                    "`response_format.json_schema.schema` has a pattern that is not a regular "
                    f"expression: {exc}",
                    param=_SCHEMA_PARAM,
                ) from None
            except RecursionError:  # nested sets, `[[[...]]]` (V1): regex's parser recurses
                raise InvalidRequest(
                    "`response_format.json_schema.schema` has a pattern nested too deeply to "
                    f"compile: {pattern[:80]!r}",
                    param=_SCHEMA_PARAM,
                ) from None


def _group_depth(pattern: str) -> int:
    """How deep the groups of a regular expression nest (escapes and sets skipped)."""
    depth = deepest = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 1
        elif c == "[":  # a set: up to its `]`, which may not be its first character
            i += 2 if pattern.startswith("^", i + 1) else 1
            i += 1 if pattern.startswith("]", i) else 0
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def _measure(schema: Any, limits: CheckSettings, max_nodes: float = math.inf) -> int | None:
    """The length of a schema's strings and keys (at least that many bytes as JSON); InvalidRequest
    once objects and arrays nest deeper than the limit; None once more than `max_nodes` values
    were seen. A loop, not recursion: the schema may be nested a thousand deep."""
    chars = seen = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > max_nodes:
            return None
        if isinstance(node, dict | list):
            if depth > limits.schema_depth:
                raise InvalidRequest(
                    "`response_format.json_schema.schema` nests objects and arrays more than "
                    f"{limits.schema_depth} levels deep (llmrouter's limit, checks.schema_depth).",
                    param=_SCHEMA_PARAM,
                )
            if isinstance(node, dict):
                chars += sum(map(len, node))
                stack.extend((v, depth + 1) for v in node.values())
            else:
                stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            chars += len(node)
    return chars


def _admitted(schema: dict[str, Any], limits: CheckSettings, max_nodes: float = math.inf) -> str | None:
    """The schema's frozen form once its depth and size are within the limits (else
    InvalidRequest); None if it has more than `max_nodes` values to look at."""
    chars = _measure(schema, limits, max_nodes)
    if chars is None or (max_nodes != math.inf and chars > _INLINE_CHARS_OF_SCHEMA):
        return None
    frozen = _freeze(schema) if chars <= limits.schema_bytes else None
    if frozen is None or len(frozen) > limits.schema_bytes:
        size = f"{len(frozen)} bytes" if frozen is not None else f"over {limits.schema_bytes} bytes"
        raise InvalidRequest(
            f"`response_format.json_schema.schema` is {size} as compact JSON; llmrouter takes "
            f"schemas of at most {limits.schema_bytes} bytes (checks.schema_bytes).",
            param=_SCHEMA_PARAM,
        )
    return frozen


def _frozen_here(schema: dict[str, Any], limits: CheckSettings) -> str | None:
    """`_admitted` for a schema small enough to look at on the event loop; None for others."""
    return _admitted(schema, limits, _INLINE_NODES)


def _freeze(schema: dict[str, Any]) -> str:
    """A hashable form of a schema, so compiled validators are shared between requests."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


class _Recent:
    """The validators of the last schemas seen, shared by the event loop and the pool's threads."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, CheckSettings], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, CheckSettings]) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, CheckSettings], value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_VALIDATORS = _Recent(256)


def _schema_validator(schema: dict[str, Any], limits: CheckSettings) -> Any:
    """The validator for answers to `schema`, once the schema is found within the limits and a
    valid JSON Schema (else InvalidRequest); cached by the schema."""
    frozen = _admitted(schema, limits)
    assert frozen is not None, "without max_nodes, _admitted measures it all"
    key = (frozen, limits)
    validator = _VALIDATORS.get(key)
    if validator is None:
        validator = _build_validator(frozen, limits)
        _VALIDATORS.put(key, validator)
    return validator


def _build_validator(frozen: str, limits: CheckSettings) -> Any:
    import jsonschema  # imported on first use: it is most of a start-up otherwise
    import referencing

    schema = json.loads(frozen)
    _check_patterns(schema, limits)  # before check_schema, which compiles them with `re`
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except RecursionError:  # not expected within the depth limit; a 400 all the same
        raise InvalidRequest(
            "`response_format.json_schema.schema` is nested too deeply to check.", param=_SCHEMA_PARAM
        ) from None
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidRequest(
            f"`response_format.json_schema.schema` is not a valid JSON Schema"
            f"{f' (at {where})' if where else ''}: {exc.message}"[:600],
            param=_SCHEMA_PARAM,
        ) from None
    _check_inside(schema)
    # Patterns are the client's, run on the model's text: each with what is left of the answer's
    # time, so that one written to backtrack for ever costs a failed check, not the server; and
    # every keyword looks at the clock first, so no schema (a chain of `$ref`s, each used twice)
    # takes the check longer than its time.
    keywords = {name: _timed(fn) for name, fn in cls.VALIDATORS.items()}
    keywords.update(pattern=_timed(_pattern), patternProperties=_timed(_pattern_properties))
    bounded = jsonschema.validators.extend(cls, keywords)  # type: ignore[no-untyped-call]
    # An empty registry: a reference is resolved inside the schema or not at all, never fetched.
    return bounded(schema, registry=referencing.Registry())


def _timed(keyword: Callable[..., Any]) -> Callable[..., Any]:
    def timed(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if time.monotonic() > _deadline.get():
            raise _OutOfTime
        return keyword(validator, value, instance, schema)

    return timed


def _search(pattern: str, text: str) -> bool:
    left = _left()
    try:
        # concurrent: the GIL is let go while it matches, so the loop runs meanwhile.
        found = regex.search(pattern, text, timeout=None if left == math.inf else left, concurrent=True)
    except TimeoutError:
        raise _OutOfTime from None
    return found is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance[:80]!r} does not match {pattern[:80]!r}")


def _pattern_properties(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Any:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)
