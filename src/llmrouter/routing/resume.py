"""Continuing a cut stream on another deployment (`resume_streams`, `provider.resume`).

The Completions API is raw continuation, so a stream that fails after its first token can be
finished by another deployment that is sent the prompt and the text so far: the client sees one
uninterrupted answer. That means the same answer only for one string prompt, one choice, and
nothing that scores or wraps the text (no `logprobs`, `echo` or `suffix`, no `response_format`
but text): `resumable` says so. A stream whose deployment sent reasoning in a field of its own
(not as text) is not continued either: the continuation would not see it, and reason again.

A `Splice` is the upstream of one streamed attempt, below the shaping that the answer goes through
once (stop sequences, reasoning): it passes its deployment's parts on, keeping the text and the
tokens of the answer, and when that deployment fails (or ends without finishing) after the commit
point, it asks the executor for a continuation and passes that on instead. So stop sequences are
found across the seam, and `max_tokens` counts across it: the first attempt is sent its limit
explicitly (the request's, else the deployment's default), and each continuation what is left.
Which deployment continues, within which attempts, budget and deadline, is the executor's to
decide (`Resume`); a failure that needs no continuation (the answer had ended; only its usage or
`[DONE]` was lost) is still the deployment's failure (`BrokeOff`).

Tokens are what a deployment reported in its stream when it reports them (vLLM's continuous usage
stats), else its text parts, a token each: an estimate, said to be one. An upstream that sends
several tokens a part makes the estimate low, and a resumed answer may then run past `max_tokens`
by that much. The usage of a resumed answer is the prompt tokens of the first (the continuation's
prompt count, less the tokens it was given back as text) and the completion tokens of every
deployment together; its cost is what each deployment was asked and gave, at its own price.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from msgspec import UNSET

from llmrouter.errors import LlmrouterError, UpstreamUnavailable
from llmrouter.generation import Generation
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.routing.streams import close
from llmrouter.structured import format_kind
from llmrouter.wire.completions import ChunkChoice, Usage

if TYPE_CHECKING:
    from llmrouter.routing.plan import Target

__all__ = ["BrokeOff", "Resume", "Splice", "first_limit", "resumable"]

# (the deployment that broke off, its failure, the text so far, its tokens, when its part
# began, the continuation's max_tokens) -> the deployment that continues and its parts; raises
# when the stream cannot go on.
Resume = Callable[
    ["Target", LlmrouterError, str, int, float, "int | None"],
    Awaitable[tuple["Target", AsyncIterator[list[StreamPart]]]],
]
# (the deployment, its failure, when its part began): judged, with nothing to continue.
BrokeOff = Callable[["Target", LlmrouterError, float], None]


def resumable(params: Generation) -> bool:
    """Whether the prompt and the text so far, sent elsewhere, ask for the rest of the same
    answer."""
    prompts = params.prompts
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


def first_limit(params: Generation, default: int | None) -> int | None:
    """The whole answer's `max_tokens`: the request's, else the deployment's `default` (None: up
    to the context)."""
    if params.max_tokens is UNSET:
        return default
    return params.max_tokens


class Splice:
    def __init__(self, target: Target, limit: int | None, resume: Resume, broke_off: BrokeOff) -> None:
        self.target = target  # the deployment streaming now
        self.committed = False  # the client has had part of the answer: failures continue it
        self.judged: LlmrouterError | None = None  # the failure the executor has already judged
        self._limit = limit
        self._resume = resume
        self._broke_off = broke_off
        self._text: list[str] = []  # choice 0's text as the deployments sent it
        self._cut: list[tuple[Target, int]] = []  # deployments that broke off, and their tokens

    @property
    def resumed(self) -> bool:
        return bool(self._cut)

    async def complete(self, call: Call) -> Completion:  # a stream's upstream: never asked
        raise AssertionError("a splice only streams")

    async def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        parts = aiter(self.target.provider.stream(call))
        began = time.perf_counter()
        while True:
            finished = reasoned = False
            counted = 0  # this deployment's text parts
            reported: Usage | None = None  # its own count so far, when it streams one
            try:
                async for batch in parts:
                    out: list[StreamPart] = []
                    for part in batch:
                        for choice in part.choices:
                            if choice.text:
                                self._text.append(choice.text)
                                counted += 1
                            reasoned = reasoned or bool(choice.reasoning)
                            finished = finished or choice.finish_reason is not None
                        usage = part.usage
                        if usage is not None and not part.usage_estimated:
                            reported = usage
                        if usage is not None and not finished:  # a count of an unfinished answer
                            if not part.choices:
                                continue
                            part = StreamPart(part.choices, None, part.system_fingerprint)
                        elif usage is not None and self._cut:
                            part = StreamPart(
                                part.choices, self._usage(usage), part.system_fingerprint, True
                            )
                        out.append(part)
                    if out:
                        yield out
                if finished or not self.committed:
                    return  # (not committed, no finish: the shaping says the stream is broken)
                failure: LlmrouterError = UpstreamUnavailable(
                    f"{self.target.label} ended the stream without a finish reason."
                )
            except LlmrouterError as exc:
                if not self.committed:
                    raise  # before the commit point the executor starts afresh elsewhere
                failure = exc
            finally:
                await close(parts)
            self.judged = failure
            if finished:  # the answer is whole; only its end (usage, [DONE]) was lost
                self._broke_off(self.target, failure, began)
                if reported is not None:  # the count it streamed is the best there is
                    yield [StreamPart([], self._usage(reported), usage_estimated=True)]
                return
            if reasoned:  # its reasoning is not in the text: a continuation would lack it
                self._broke_off(self.target, failure, began)
                raise failure
            tokens = (reported.completion_tokens if reported else counted) + self._given
            limit = None if self._limit is None else max(0, self._limit - tokens)
            if limit == 0:  # it had sent every token the request allows: the answer is whole
                self._broke_off(self.target, failure, began)
                usage = None if reported is None else self._usage(reported)
                yield [StreamPart([ChunkChoice("", 0, None, "length")], usage, usage_estimated=True)]
                return
            try:
                target, parts = await self._resume(
                    self.target, failure, "".join(self._text), tokens, began, limit
                )
            except LlmrouterError as exc:
                self.judged = exc
                raise
            self._cut.append((self.target, tokens - self._given))
            self.target, began = target, time.perf_counter()

    @property
    def _given(self) -> int:
        """Tokens the deployments that broke off sent."""
        return sum(t for _, t in self._cut)

    def _usage(self, usage: Usage) -> Usage:
        """The continuation's count, as the count of the whole answer."""
        given = self._given
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
