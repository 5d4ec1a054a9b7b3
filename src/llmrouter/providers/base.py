"""The one small protocol every provider adapter implements, and the values that cross it.

An adapter turns a `Call` (one attempt's `Generation`, the neutral request) into one provider
request, and the provider's answer into the choices and usage the router returns.
It raises only errors from `llmrouter.errors`: foreign exceptions are translated at its boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, get_args

import msgspec
from msgspec import UNSET, Struct, UnsetType

from llmrouter.generation import Generation
from llmrouter.providers._chat_template import ChatTemplate
from llmrouter.settings import DeploymentSettings, Timeouts, UpstreamParameter
from llmrouter.wire.completions import ChunkChoice, CompletionChoice, Usage

__all__ = [
    "ALL_PARAMETERS",
    "CHAT_PARAMETERS",
    "Call",
    "Capabilities",
    "Completion",
    "Provider",
    "StreamPart",
    "Tokenized",
    "Tokenizer",
    "Upstream",
    "normalise_finish_reason",
]

# The chat API's function calling and reasoning knobs: chat kinds translate them; a completions
# kind has no place for them.
CHAT_PARAMETERS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "reasoning", "name"})

# Every request field a deployment may or may not honour, by its wire name. `model`, `models`,
# `stream_options`, `user` and `metadata` are the router's own and are always honoured.
ALL_PARAMETERS: frozenset[str] = (
    frozenset(get_args(UpstreamParameter))
    - {"prompt_token_ids", "prompt_batch", "stream_usage", "max_tokens_zero"}
) | {"max_tokens", "response_format"}


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one deployment honours exactly. The plan sends a request only where all of it fits."""

    parameters: frozenset[str]
    response_formats: frozenset[str] = frozenset({"text"})
    max_logprobs: int = 5
    token_prompts: bool = True
    prompt_batch: bool = True  # several prompts in one call
    max_tokens_zero: bool = True  # max_tokens: 0 means no completion (not "no limit")
    # best_of > n means generating extra candidates and choosing: only where the engine can rank.
    best_of_above_n: bool = False
    stream_usage: bool = True  # reports usage at the end of a stream
    # The output cap a request without `max_tokens` gets here (the API's 16, or a `defaults`;
    # None: up to the context).
    default_max_tokens: int | None = 16
    # The values it takes, where fewer than the API allows: {parameter: (min, max)}, both ends
    # included, None for no bound. A request outside them is not sent here.
    ranges: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict, hash=False)
    max_stops: int | None = None  # stop sequences it takes natively; beyond these, the router's
    stop_ok: Callable[[str], bool] | None = None  # one it takes natively (else: the router's)
    # For a native `json_schema`: (schema, strict) -> None when it takes the schema, else why
    # not (then the router checks the answers instead). Unset: it takes every schema.
    schema_support: Callable[[dict[str, Any], bool], str | None] | None = None
    # A chat API: it takes a conversation (`Generation.messages`) as it is, and a prompt as one
    # user message (the router says so: `prompt` emulated). Other kinds take prompts, and a
    # conversation through the model's chat template, when it has one (the adapter renders it).
    chat: bool = False
    chat_template: ChatTemplate | None = field(default=None, hash=False)
    vision: bool = False  # it takes images in messages
    strict_tools: bool = False  # it holds calls to a `strict` function's schema
    # The kind's own rules between a request's fields: (parameter, why) for one it cannot take
    # as asked (Anthropic, thinking, takes no temperature but 1), else None.
    refuses: Callable[[Generation], tuple[str, str] | None] | None = field(default=None, hash=False)
    # Which of the `reasoning` request's knobs it has (where `reasoning` is native).
    reasoning: frozenset[str] = frozenset({"effort", "max_tokens", "enabled"})


class Call(Struct, frozen=True):
    """One attempt at one deployment, as the adapter sees it. (A struct: made for every attempt,
    where a frozen dataclass costs several times as much.)"""

    deployment: DeploymentSettings
    request: Generation  # what this call asks (its prompts: those of this call only)
    timeouts: Timeouts
    request_id: str = ""
    extra_headers: dict[str, str] = msgspec.field(default_factory=dict)


class Completion(Struct):
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | UnsetType = UNSET


class StreamPart(Struct, gc=False):
    """A piece of a streamed answer: deltas for some choices, and usage once, at the end. (Not
    tracked by the cyclic GC, as `ChunkChoice`.)"""

    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | UnsetType = UNSET
    usage_estimated: bool = False  # counted by llmrouter because the provider sent none


@dataclass(frozen=True, slots=True)
class Tokenized:
    tokens: list[int]
    token_strs: list[str] | None = None  # when asked for
    max_model_len: int | None = None  # when the tokenizer's side knows it


class Tokenizer(Protocol):
    """A deployment's own tokenizer, as /tokenize and /detokenize reach it: the local model's, or
    an upstream's tokenizer endpoints. Errors are `llmrouter.errors`, as for calls."""

    async def tokenize(self, text: str, *, add_special: bool, strings: bool) -> Tokenized:
        """`text` read as a /completions string prompt is read on this deployment."""

    async def detokenize(self, tokens: list[int]) -> str: ...

    # Whether `info` answers (llama.cpp's server has no /tokenizer_info).
    has_info: bool

    async def info(self) -> dict[str, Any]:
        """What lm-eval's remote tokenizer reads: `bos_token`, `eos_token`, `chat_template`..."""


class Upstream(Protocol):
    """What one attempt asks of a deployment's adapter: a whole answer, or a stream of it."""

    async def complete(self, call: Call) -> Completion: ...

    def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        """Yield the answer as it comes, the parts that came together (one read of an upstream's
        body) in one list, never empty: every layer above takes them in one go, and the client
        gets them in one write. Raising before the first part is a normal failure."""


class Provider(Upstream, Protocol):
    name: str
    timeouts: Timeouts

    async def start(self) -> None:
        """Open pools, load models. Called once before the first call."""

    async def aclose(self) -> None:
        """Release everything `start` opened."""

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities: ...

    def usable(self, deployment: DeploymentSettings) -> bool:
        """Whether the deployment can take a call now (a local model still loading queues it)."""

    def ready(self, deployment: DeploymentSettings) -> bool:
        """Whether the deployment would answer at once (a local model has loaded): for /ready."""

    def tokenizer(self, deployment: DeploymentSettings) -> Tokenizer | None:
        """The deployment's tokenizer, if the router can reach one."""


def normalise_finish_reason(native: str | None) -> str:
    """Map a provider's raw finish reason onto the spec's three (and chat's `tool_calls`)."""
    if native in ("tool_calls", "function_call"):
        return "tool_calls"
    if native in ("length", "max_tokens", "MAX_TOKENS"):
        return "length"
    if native in ("content_filter", "SAFETY", "refusal", "RECITATION"):
        return "content_filter"
    return "stop"
