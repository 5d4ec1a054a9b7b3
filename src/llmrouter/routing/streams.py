"""A stream once it is committed to a deployment, and the pieces every streamed attempt shares.

`CommittedStream` is the rest of an answer after its first part has gone to the client: from then
on a failure is not a fallback (that would repeat text) but the end of the stream, unless a
`Splice` continues it on another deployment (`routing/resume.py`). `open_continuation` opens that
other deployment, as far as its first token. The time limits of an attempt (the earlier of a
phase's timeout and the request's deadline) are here too, for the executor and for these.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmrouter.emulation.shape import deltas
from llmrouter.errors import DeadlineExceeded, LlmrouterError, UpstreamTimeout, UpstreamUnavailable
from llmrouter.providers.base import Call, StreamPart
from llmrouter.routing.health import HealthBook
from llmrouter.wire.completions import ChunkChoice

if TYPE_CHECKING:
    from llmrouter.routing.plan import Target
    from llmrouter.routing.resume import Splice

__all__ = [
    "Attempt",
    "CommittedStream",
    "OpenStream",
    "close",
    "from_produced",
    "limit_at",
    "open_continuation",
    "produced",
    "timed_out",
    "until_produced",
]


@dataclass(frozen=True, slots=True)
class Attempt:
    target: str
    outcome: str  # "ok", "cancelled" (a hedge that lost), or the error's code
    ms: float
    # "panic": tried although ejected, because everything in the plan was; "resumed": it
    # continued a stream another deployment broke off
    note: str = ""

    def __str__(self) -> str:
        text = f"{self.target} {self.outcome} {self.ms:.0f}ms"
        return f"{text} {self.note}" if self.note else text


class CommittedStream:
    """The rest of a committed stream, in batches of parts (see `Upstream.stream`). A failure, the
    request's deadline, or an end without every choice's finish reason is raised to the API layer
    and (when it is the deployment's fault) counts against it. `aclose` releases the upstream; it
    is safe to call more than once, and before iteration has begun. With a `splice`, a failure
    may instead be continued on another deployment (see `routing/resume.py`): `target` is the
    one streaming now."""

    def __init__(
        self,
        health: HealthBook,
        target: Target,
        first: list[StreamPart],
        parts: AsyncIterator[list[StreamPart]],
        deadline: float,
        splice: Splice | None = None,
        started: float | None = None,
    ) -> None:
        """`started`: when the attempt began (`time.perf_counter`; default now), which its
        throughput is timed from, as a complete answer's is: over the whole attempt."""
        self._health = health
        self._target = target
        self._splice = splice
        self._parts = parts
        self._deadline = deadline
        self._started = time.perf_counter() if started is None else started
        self._open_choices: set[int] = set()
        self._track(first)
        self._closed = False
        # The deadline is one timer for the whole stream, not a timeout per batch: it cancels
        # the consumer only while that waits for a batch (never while it writes one out), and a
        # deadline that passed meanwhile is raised at the next batch.
        self._consumer: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = self._expired = False
        self._cancelled = -1  # the consumer's cancel count before the wait the deadline cut
        self._cancelling_before = 0

    def __aiter__(self) -> CommittedStream:
        return self

    def _expire(self) -> None:
        self._expired = True
        consumer = self._consumer
        if self._waiting and consumer is not None and not consumer.done():
            self._cancelled = self._cancelling_before
            consumer.cancel()

    async def __anext__(self) -> list[StreamPart]:
        if self._consumer is None:
            self._consumer = asyncio.current_task()
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._expire)
        try:
            if self._expired:
                raise TimeoutError
            # As asyncio.Timeout: the cancellations the consumer had before this wait are not
            # the deadline's (one that came just before the timer fired is the client's).
            self._cancelling_before = self._consumer.cancelling() if self._consumer else 0
            self._waiting = True
            try:
                parts = await anext(self._parts)
            except asyncio.CancelledError:
                consumer = self._consumer
                if (
                    self._cancelled >= 0
                    and consumer is not None
                    and consumer.uncancel() <= self._cancelled
                ):
                    raise TimeoutError from None  # the deadline's own cancellation
                raise
            finally:
                self._waiting = False
        except StopAsyncIteration:
            await self.aclose()
            if self._open_choices:
                raise self._failed(
                    UpstreamUnavailable(
                        f"{self.target.label} ended the stream without a finish reason for choice "
                        f"{min(self._open_choices)}."
                    )
                ) from None
            raise
        except TimeoutError:
            await self.aclose()
            raise DeadlineExceeded("The request's deadline passed during the stream.") from None
        except LlmrouterError as exc:
            await self.aclose()
            raise self._failed(exc) from None
        self._track(parts)
        return parts

    def _track(self, parts: list[StreamPart]) -> None:
        """Which choices are still open; the deployment's throughput, once its count comes."""
        open_choices = self._open_choices
        for part in parts:
            for choice in part.choices:
                if choice.finish_reason is None:
                    open_choices.add(choice.index)
                else:
                    open_choices.discard(choice.index)
            if part.usage is not None and part.usage.completion_tokens:
                elapsed = time.perf_counter() - self._started
                if elapsed > 0:
                    tokens_per_second = part.usage.completion_tokens / elapsed
                    self._health.observe_throughput(self.target.label, tokens_per_second)

    @property
    def target(self) -> Target:
        return self._target if self._splice is None else self._splice.target

    @property
    def splice(self) -> Splice | None:
        return self._splice

    def _failed(self, exc: LlmrouterError) -> LlmrouterError:
        judged = self._splice is not None and self._splice.judged is exc  # when it broke off
        if exc.blames_deployment and not judged:
            self._health.record(self.target.label, False)
        return exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._health.finished(self.target.label)
        await close(self._parts)


@dataclass(slots=True)
class OpenStream:
    """A stream that has produced its first part: committed to `target` (with a splice, the
    deployment that continues it is `rest.target`). `first` is the batch that part came in,
    from that part on."""

    target: Target
    first: list[StreamPart]
    rest: CommittedStream
    attempts: list[Attempt] = field(default_factory=list)

    async def aclose(self) -> None:
        await self.rest.aclose()


async def open_continuation(
    target: Target, call: Call, deadline: float
) -> AsyncIterator[list[StreamPart]]:
    """The continuation's stream, once it has produced something (within its time to first
    token, or its total time when it is a complete answer)."""
    shape = target.shape
    assert shape is not None, "a plan's targets carry their shape"
    if shape.buffered:  # it cannot stream this request: its whole answer, as one part
        limit, is_deadline = limit_at(deadline, call.timeouts.total)
        try:
            async with asyncio.timeout_at(limit):
                result = await target.provider.complete(call)
        except TimeoutError:
            raise timed_out(target.label, "did not finish in time", is_deadline) from None
        choices = [
            ChunkChoice(
                c.text,
                c.index,
                None,
                c.finish_reason,
                c.native_finish_reason,
                c.reasoning,
                deltas(c),
                c.refusal,
            )
            for c in result.choices
        ]
        return _batches_of([StreamPart(choices, result.usage, result.system_fingerprint)])
    parts = aiter(target.provider.stream(call))
    held = await until_produced(parts, target.label, deadline, call.timeouts.first_token)
    return _chained(held, parts)


async def until_produced(
    parts: AsyncIterator[list[StreamPart]], label: str, deadline: float, seconds: float
) -> list[StreamPart]:
    """A stream's parts as far as the batch of the first with something for the client, within
    `seconds` (and the request's `deadline`, in loop time). On any failure the stream is
    closed, and a timeout or an empty stream is raised as the deployment's failure."""
    held: list[StreamPart] = []
    limit, is_deadline = limit_at(deadline, seconds)
    try:
        async with asyncio.timeout_at(limit):
            while True:
                batch = await anext(parts)
                held += batch
                if any(produced(part) for part in batch):
                    break
    except BaseException as exc:
        await close(parts)
        if isinstance(exc, TimeoutError):
            raise timed_out(label, "produced no token in time", is_deadline) from None
        if isinstance(exc, StopAsyncIteration):
            raise UpstreamUnavailable(f"{label} ended without an answer.") from None
        raise
    return held


def from_produced(parts: list[StreamPart]) -> list[StreamPart]:
    """`parts` from the first with something for the client on (those before it say nothing)."""
    for i, part in enumerate(parts):
        if produced(part):
            return parts[i:]
    return []


async def _chained(
    held: list[StreamPart], parts: AsyncIterator[list[StreamPart]]
) -> AsyncIterator[list[StreamPart]]:
    try:
        yield held
        async for batch in parts:
            yield batch
    finally:
        await close(parts)


async def _batches_of(parts: list[StreamPart]) -> AsyncIterator[list[StreamPart]]:
    yield parts


def limit_at(deadline: float, seconds: float) -> tuple[float, bool]:
    """The earlier of the request's deadline and `seconds` from now, in loop time; and whether it
    is the deadline."""
    limit = asyncio.get_running_loop().time() + seconds
    return (deadline, True) if deadline <= limit else (limit, False)


def timed_out(label: str, what: str, is_deadline: bool) -> UpstreamTimeout:
    if is_deadline:
        return DeadlineExceeded(f"The request's deadline passed while {label} was working.")
    return UpstreamTimeout(f"{label} {what}.")


def produced(part: StreamPart) -> bool:
    """Whether a part has anything for the client: text, reasoning, a token (whose text may be
    empty: part of a character), a piece of a tool call, or the end of a choice."""
    return any(
        c.text
        or c.reasoning
        or c.tool_calls
        or c.finish_reason is not None
        or (c.logprobs and c.logprobs.tokens)
        for c in part.choices
    )


async def close(parts: object) -> None:
    closer = getattr(parts, "aclose", None)
    if closer is not None:
        await closer()
