"""Continuing a cut stream on another deployment (`resume_streams`, `provider.resume`).

The Completions API is raw continuation, so a stream that fails after its first token can be
finished by another deployment that is sent the prompt and the text so far: the client sees one
uninterrupted answer. That means the same answer only for one string prompt, one choice, and
nothing that scores or wraps the text (no `logprobs`, `echo` or `suffix`, no `response_format`
but text): `resumable` says so.

A `Splice` is the upstream of one streamed attempt, below the shaping that the answer goes through
once (stop sequences, reasoning): it passes its deployment's parts on, keeping the text and the
tokens of the answer, and when that deployment fails (or ends without finishing) after the commit
point, it asks the executor for a continuation and passes that on instead. So stop sequences are
found across the seam, and `max_tokens` counts across it. Which deployment continues, and within
which attempts, budget and deadline, is the executor's to decide (`Continue`).

The usage of a resumed answer is the prompt tokens of the first (the continuation's prompt count,
less the tokens it was given back as text) and the completion tokens of every deployment together,
counted a text part a token for the ones that were cut: an estimate, and said to be one. Its cost
is what each deployment was asked and gave, at its own price.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from msgspec import UNSET

from llmrouter.errors import LlmrouterError, UpstreamUnavailable
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.structured import format_kind
from llmrouter.wire.completions import CompletionCreateParams, Usage
from llmrouter.wire.validate import Prompts

if TYPE_CHECKING:
    from llmrouter.routing.plan import Target

__all__ = ["Continue", "Splice", "continuation_limit", "resumable"]

_DEFAULT_MAX_TOKENS = 16  # the Completions API's default

# (the deployment that broke off, its failure, the text so far, its tokens, when its part
# began) -> the deployment that continues and its parts; raises when the stream cannot go on.
Continue = Callable[
    ["Target", LlmrouterError, str, int, float],
    Awaitable[tuple["Target", AsyncIterator[StreamPart]]],
]


def resumable(params: CompletionCreateParams, prompts: Prompts) -> bool:
    """Whether the prompt and the text so far, sent elsewhere, ask for the rest of the same
    answer."""
    return (
        len(prompts) == 1
        and isinstance(prompts[0], str)
        and (params.n or 1) == 1
        and (params.best_of or 1) == 1
        and params.logprobs is None
        and not params.echo
        and params.suffix is None
        and format_kind(params.response_format) == "text"
    )


def continuation_limit(params: CompletionCreateParams, tokens: int) -> int | None:
    """The continuation's `max_tokens` once `tokens` have been sent (None: up to its context)."""
    if params.max_tokens is None:
        return None
    limit = _DEFAULT_MAX_TOKENS if params.max_tokens is UNSET else params.max_tokens
    return max(0, limit - tokens)


class Splice:
    def __init__(self, target: Target, continue_: Continue) -> None:
        self.target = target  # the deployment streaming now
        self.committed = False  # the client has had part of the answer: failures continue it
        self._continue = continue_
        self._text: list[str] = []  # choice 0's text as the deployments sent it
        self._tokens = 0  # text parts sent so far, by every deployment
        self._cut: list[tuple[Target, int]] = []  # deployments that broke off, and their tokens

    @property
    def resumed(self) -> bool:
        return bool(self._cut)

    async def complete(self, call: Call) -> Completion:  # a stream's upstream: never asked
        raise AssertionError("a splice only streams")

    async def stream(self, call: Call) -> AsyncIterator[StreamPart]:
        parts = aiter(self.target.provider.stream(call))
        began = time.perf_counter()
        while True:
            finished = False
            try:
                async for part in parts:
                    for choice in part.choices:
                        if choice.text:
                            self._text.append(choice.text)
                            self._tokens += 1
                        finished = finished or choice.finish_reason is not None
                    usage = part.usage
                    if usage is not None and not finished:
                        if not part.choices:  # a count of an answer that did not end: ours
                            continue
                        part = StreamPart(part.choices, None, part.system_fingerprint)
                    elif usage is not None and self._cut:
                        part = StreamPart(
                            part.choices, self._usage(usage), part.system_fingerprint, True
                        )
                    yield part
                if finished or not self.committed:
                    return  # (not committed, no finish: the shaping says the stream is broken)
                failure: LlmrouterError = UpstreamUnavailable(
                    f"{self.target.label} ended the stream without a finish reason."
                )
            except LlmrouterError as exc:
                if not self.committed:
                    raise  # before the commit point the executor starts afresh elsewhere
                if finished:
                    return  # the answer is whole; only its end (usage, [DONE]) was lost
                failure = exc
            finally:
                await _close(parts)
            cut = self.target, self._tokens - sum(t for _, t in self._cut)
            target, parts = await self._continue(
                self.target, failure, "".join(self._text), self._tokens, began
            )
            self._cut.append(cut)
            self.target, began = target, time.perf_counter()

    def _usage(self, usage: Usage) -> Usage:
        """The continuation's count, as the count of the whole answer."""
        given = sum(t for _, t in self._cut)
        prompt = max(0, usage.prompt_tokens - given)
        completion = given + usage.completion_tokens
        return Usage(prompt, completion, prompt + completion)

    def cost(self, usage: Usage) -> float:
        """What the answer cost: each deployment at its price for what it was sent and gave."""
        prompt, given, total = usage.prompt_tokens, 0, 0.0
        for target, tokens in self._cut:
            total += target.cost(prompt + given, tokens)
            given += tokens
        return total + self.target.cost(prompt + given, max(0, usage.completion_tokens - given))


async def _close(parts: object) -> None:
    closer = getattr(parts, "aclose", None)
    if closer is not None:
        await closer()
