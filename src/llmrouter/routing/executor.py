"""Executing a plan: the one place that makes attempts, retries, falls back, hedges and times out.

Walk the plan's targets in order, skipping deployments that are ejected or inside an upstream's
Retry-After, wherever they are in the plan. Only when nothing in the whole plan is in rotation does
a request try one anyway, once: the ejected deployment whose cooldown ends first (Envoy's panic
mode; its attempt is marked `panic`, and if it answers it is back in rotation at once). A retryable
failure moves on to the next target at once (a prompt too long for a model moves on to the
request's other models; a content refusal never goes back to the same deployment); when a whole
pass over the plan has failed, the next pass waits a backoff with full jitter first.

The first attempt at each model the request names (its `model`, then each of `models`) is the
client's own instruction and costs nothing; every other attempt (another deployment of the same
model, a second pass, a hedge, asking again after an invalid answer) spends from the retry budget
shared by all requests (`routing/budget.py`). No attempt runs past the request's deadline.

With `hedge_after_ms` on the model, a first attempt that has produced nothing by then gets a second
one beside it, on the next target; the first to produce wins and the other is cancelled. Without
it, attempts are awaited in place: the common path spawns no task.

The commit point is the first byte for the client: a stream commits when its first part arrives.
After that a failure ends the stream (the API layer sends one error event), never a restart
elsewhere; a stream that stops without a finish reason for every choice is such a failure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from llmrouter.emulation.shape import Shape
from llmrouter.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidOutput,
    LlmrouterError,
    ProviderError,
    ServiceUnavailable,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.routing.budget import RetryBudget
from llmrouter.routing.health import HealthBook
from llmrouter.routing.plan import Plan, Target
from llmrouter.settings import RoutingSettings
from llmrouter.wire.completions import CompletionCreateParams
from llmrouter.wire.validate import Prompts

__all__ = ["Attempt", "CommittedStream", "Executor", "OpenStream"]

T = TypeVar("T")
Opened = tuple[StreamPart, AsyncIterator[StreamPart]]
# An attempt: the target, its call, and the loop time by which it must be over.
AttemptFn = Callable[[Target, Call, float], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class Attempt:
    target: str
    outcome: str  # "ok", "cancelled" (a hedge that lost), or the error's code
    ms: float
    note: str = ""  # "panic": tried although ejected, because everything in the plan was

    def __str__(self) -> str:
        text = f"{self.target} {self.outcome} {self.ms:.0f}ms"
        return f"{text} {self.note}" if self.note else text


class CommittedStream:
    """The rest of a committed stream. A failure, the request's deadline, or an end without
    every choice's finish reason is raised to the API layer and (when it is the deployment's
    fault) counts against it. `aclose` releases the upstream; it is safe to call more than once,
    and before iteration has begun."""

    def __init__(
        self,
        health: HealthBook,
        target: Target,
        first: StreamPart,
        parts: AsyncIterator[StreamPart],
        deadline: float,
    ) -> None:
        self._health = health
        self._label = target.label
        self._parts = parts
        self._deadline = deadline
        self._open_choices = {c.index for c in first.choices if c.finish_reason is None}
        self._started = time.perf_counter()
        self._closed = False

    def __aiter__(self) -> CommittedStream:
        return self

    async def __anext__(self) -> StreamPart:
        try:
            async with asyncio.timeout_at(self._deadline):
                part = await anext(self._parts)
        except StopAsyncIteration:
            await self.aclose()
            if self._open_choices:
                raise self._failed(
                    UpstreamUnavailable(
                        f"{self._label} ended the stream without a finish reason for choice "
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
        for choice in part.choices:
            if choice.finish_reason is None:
                self._open_choices.add(choice.index)
            else:
                self._open_choices.discard(choice.index)
        if part.usage is not None and part.usage.completion_tokens:
            elapsed = time.perf_counter() - self._started
            if elapsed > 0:
                self._health.observe_throughput(self._label, part.usage.completion_tokens / elapsed)
        return part

    def _failed(self, exc: LlmrouterError) -> LlmrouterError:
        if _is_sick(exc):
            self._health.record(self._label, False)
        return exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._health.finished(self._label)
        await _close(self._parts)


@dataclass(slots=True)
class OpenStream:
    """A stream that has produced its first part: committed to `target`."""

    target: Target
    first: StreamPart
    rest: CommittedStream
    attempts: list[Attempt] = field(default_factory=list)

    async def aclose(self) -> None:
        await self.rest.aclose()


@dataclass(slots=True)
class _Running(Generic[T]):
    target: Target
    started: float
    task: asyncio.Task[T]


class _Run(Generic[T]):
    """One request's way through its plan."""

    def __init__(
        self,
        plan: Plan,
        params: CompletionCreateParams,
        prompts: Prompts,
        request_id: str,
        attempt: AttemptFn[T],
        discard: Callable[[Target, T], Awaitable[None]] | None,
        deadline: float,
        health: HealthBook,
    ) -> None:
        self.health = health
        self.plan = plan
        self.params = params
        self.prompts = prompts
        self.request_id = request_id
        self.attempt = attempt
        self.discard = discard
        self.deadline = deadline  # loop time
        self.attempts: list[Attempt] = []
        self.running: list[_Running[T]] = []  # hedged attempts in flight
        self.tried: set[str] = set()  # in the current pass over the plan
        self.models_tried: set[str] = set()  # a first attempt at these costs the budget nothing
        self.panic: str | None = None  # the deployment tried in panic mode (once a request)
        self.too_small: set[str] = set()  # models whose context the request does not fit
        self.refused: set[str] = set()  # deployments whose content policy refused it
        self.invalid: dict[str, int] = {}  # answers that failed response_format, per deployment
        self.again: Target | None = None  # ask this one again (its answer was invalid)
        self.passes = 0
        self.started = 0
        self.last_error: LlmrouterError | None = None
        self.winner: tuple[Target, T] | None = None
        self.stop = False

    def start(self, target: Target) -> Awaitable[T]:
        if target.label != self.panic:  # (a panic attempt is no probe: it fails as ejected)
            self.health.claim(target.label)
        self.tried.add(target.label)
        self.models_tried.add(target.model.id)
        self.started += 1
        call = Call(
            target.deployment,
            _shape(target).params,
            self.prompts,
            target.provider.timeouts,
            self.request_id,
        )
        return self.attempt(target, call, self.deadline)

    def launch(self, target: Target) -> None:
        task = asyncio.ensure_future(self.start(target))
        self.running.append(_Running(target, time.perf_counter(), task))

    def may_answer(self, target: Target) -> bool:
        """Whether `target` could still answer this request (as far as the request goes)."""
        return target.model.id not in self.too_small and target.label not in self.refused

    def nothing_left(self) -> bool:
        return not any(self.may_answer(t) for t in self.plan.targets)

    def note(self, target: Target) -> str:
        return "panic" if target.label == self.panic else ""

    async def cancel_running(self) -> None:
        """Cancel the attempts still in flight (a hedge that lost, or all of them when the client
        left), wait for them to unwind, and release what they opened."""
        running, self.running = self.running, []
        for r in running:
            r.task.cancel()
        for r in running:
            self.attempts.append(Attempt(r.target.label, "cancelled", _ms(r.started)))
        for r in running:
            await _settle(r.task, r.target, self.discard, self.health)


class Executor:
    def __init__(
        self,
        routing: RoutingSettings,
        health: HealthBook,
        rng: random.Random | None = None,
    ) -> None:
        self._routing = routing
        self._health = health
        b = routing.retry_budget
        self._budget = RetryBudget(b.ratio, b.min_per_second, b.ttl_seconds)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets

    # -- the two kinds of request -------------------------------------------------------------

    async def complete(
        self, plan: Plan, params: CompletionCreateParams, prompts: Prompts, request_id: str
    ) -> tuple[Target, Completion, list[Attempt]]:
        health = self._health

        async def attempt(target: Target, call: Call, deadline: float) -> Completion:
            label = target.label
            started = time.perf_counter()
            health.started(label)
            limit, is_deadline = _by(deadline, call.timeouts.total)
            try:
                async with asyncio.timeout_at(limit):
                    result = await _shape(target).complete(target.provider, call)
            except TimeoutError:
                raise _timeout(label, "did not finish in time", is_deadline) from None
            finally:
                health.finished(label)
            elapsed = time.perf_counter() - started
            health.observe_latency(label, elapsed)
            if result.usage.completion_tokens and elapsed > 0:
                health.observe_throughput(label, result.usage.completion_tokens / elapsed)
            return result

        target, result, attempts, _ = await self._run(plan, params, prompts, request_id, attempt)
        return target, result, attempts

    async def open_stream(
        self, plan: Plan, params: CompletionCreateParams, prompts: Prompts, request_id: str
    ) -> OpenStream:
        health = self._health

        async def attempt(target: Target, call: Call, deadline: float) -> Opened:
            started = time.perf_counter()
            health.started(target.label)
            shape = _shape(target)
            parts = aiter(shape.stream(target.provider, call))
            # A stream served from a complete answer has its first part when the answer is done.
            wait = call.timeouts.total if shape.buffered else call.timeouts.first_token
            limit, is_deadline = _by(deadline, wait)
            try:
                async with asyncio.timeout_at(limit):
                    first = await anext(parts)
                    while not _produced(first):  # nothing for the client yet: not committed
                        first = await anext(parts)
            except BaseException as exc:
                health.finished(target.label)
                await _close(parts)
                if isinstance(exc, TimeoutError):
                    raise _timeout(target.label, "produced no token in time", is_deadline) from None
                if isinstance(exc, StopAsyncIteration):
                    raise UpstreamUnavailable(f"{target.label} ended without an answer.") from None
                raise
            health.observe_latency(target.label, time.perf_counter() - started)
            return first, parts

        async def discard(target: Target, opened: Opened) -> None:
            health.finished(target.label)
            await _close(opened[1])

        target, (first, parts), attempts, deadline = await self._run(
            plan, params, prompts, request_id, attempt, discard
        )
        rest = CommittedStream(health, target, first, parts, deadline)
        return OpenStream(target, first, rest, attempts)

    # -- the way through a plan ---------------------------------------------------------------

    async def _run(
        self,
        plan: Plan,
        params: CompletionCreateParams,
        prompts: Prompts,
        request_id: str,
        attempt: AttemptFn[T],
        discard: Callable[[Target, T], Awaitable[None]] | None = None,
    ) -> tuple[Target, T, list[Attempt], float]:
        """Attempts until one succeeds (and the request's deadline, in loop time); `discard`
        releases a result that came in too late (a hedge that also produced)."""
        self._budget.deposit()
        deadline = asyncio.get_running_loop().time() + self._routing.deadline_seconds
        run = _Run(plan, params, prompts, request_id, attempt, discard, deadline, self._health)
        hedge_ms = plan.targets[0].model.hedge_after_ms
        target: Target | None = self._first_target(run)
        try:
            while target is not None:
                if hedge_ms is None:
                    await self._attempt(run, target)
                else:
                    await self._race(run, target, hedge_ms / 1000)
                if run.winner is not None:
                    return run.winner[0], run.winner[1], run.attempts, deadline
                if run.stop:
                    break
                target = await self._next(run)
        finally:
            await run.cancel_running()
        assert run.last_error is not None
        run.last_error.attempts = run.attempts
        raise run.last_error

    async def _attempt(self, run: _Run[T], target: Target) -> None:
        """One attempt, awaited in place."""
        started = time.perf_counter()
        try:
            result = await run.start(target)
        except LlmrouterError as exc:
            self._failed(run, target, exc, _ms(started))
        else:
            self._won(run, target, result, _ms(started))

    async def _race(self, run: _Run[T], first: Target, hedge_after: float) -> None:
        """`first`, and if it has produced nothing after `hedge_after`, the next target beside
        it; the first to produce wins and the other is cancelled."""
        loop = asyncio.get_running_loop()
        run.launch(first)
        hedged = False
        while run.running and run.winner is None and not run.stop:
            wait = run.deadline - loop.time()
            if not hedged:
                wait = min(wait, hedge_after - (time.perf_counter() - run.running[0].started))
            done, _ = await asyncio.wait(
                [r.task for r in run.running],
                timeout=max(wait, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                if loop.time() >= run.deadline:
                    run.last_error = DeadlineExceeded("The request's deadline passed.")
                    run.stop = True
                elif not hedged:
                    hedged = True
                    nxt = self._pick(run) if run.started < self._routing.max_attempts else None
                    if nxt is not None and self._budget.try_withdraw():  # a hedge always costs
                        run.launch(nxt)
                continue
            for finished in [r for r in run.running if r.task in done]:
                run.running.remove(finished)
                ms = _ms(finished.started)
                try:
                    result = finished.task.result()
                except LlmrouterError as exc:
                    self._failed(run, finished.target, exc, ms)
                    continue
                if run.winner is None:
                    self._won(run, finished.target, result, ms)
                else:  # produced too, but too late: healthy, and what it opened is released
                    self._health.record(finished.target.label, True)
                    if run.discard is not None:
                        await run.discard(finished.target, result)

    async def _next(self, run: _Run[T]) -> Target | None:
        """After a failure: the next target of this pass, or of a new pass after a backoff; None
        when the attempts, the budget, the deadline or the plan are used up."""
        loop = asyncio.get_running_loop()
        if loop.time() >= run.deadline:
            return None
        if run.again is not None:  # not counted in max_attempts: it is the same deployment
            again, run.again = run.again, None
            run.started -= 1
            if self._budget.try_withdraw():
                return again
            run.attempts.append(Attempt(again.label, "retry_budget_exhausted", 0.0))
            return None
        if run.started >= self._routing.max_attempts or run.nothing_left():
            return None
        nxt = self._pick(run)
        if nxt is None:
            run.passes += 1
            run.tried.clear()
            delay = self._backoff(run.passes)
            if loop.time() + delay >= run.deadline:
                return None
            await asyncio.sleep(delay)
            nxt = self._pick(run)
            if nxt is None:
                return None
        if nxt.model.id not in run.models_tried or self._budget.try_withdraw():
            return nxt
        run.attempts.append(Attempt(nxt.label, "retry_budget_exhausted", 0.0))
        return self._pick(run, first_at_model=True)  # a model the request named, not yet tried

    def _won(self, run: _Run[T], target: Target, result: T, ms: float) -> None:
        run.attempts.append(Attempt(target.label, "ok", ms, run.note(target)))
        self._health.record(target.label, True)
        if target.label == run.panic:
            self._health.restore(target.label)
        run.winner = target, result

    def _failed(self, run: _Run[T], target: Target, exc: LlmrouterError, ms: float) -> None:
        run.attempts.append(Attempt(target.label, exc.code, ms, run.note(target)))
        if exc.retryable and exc.retry_after:  # the upstream said when to come back
            self._health.skip_for(target.label, exc.retry_after)
            self._health.release(target.label)
        elif _is_sick(exc):
            self._health.record(target.label, False)
        else:  # about the request, not the deployment
            self._health.release(target.label)
        run.last_error = exc
        if isinstance(exc, ContextLengthExceeded):
            run.too_small.add(target.model.id)  # the request's other models may fit it
        elif isinstance(exc, UpstreamRefused):
            run.refused.add(target.label)  # asking it again would be refused again
        elif isinstance(exc, InvalidOutput):
            count = run.invalid[target.label] = run.invalid.get(target.label, 0) + 1
            if count <= self._routing.invalid_output_retries and not _deterministic(run.params):
                run.again = target
            else:  # asked again, it would say the same: on to the next deployment
                run.refused.add(target.label)
        elif not exc.retryable:
            run.stop = True

    # -- choosing -----------------------------------------------------------------------------

    def _first_target(self, run: _Run[T]) -> Target:
        target = self._pick(run)
        if target is not None:
            return target
        labels = ", ".join(t.label for t in run.plan.targets)
        raise ServiceUnavailable(
            f"Every deployment that could serve this request asked to wait ({labels}).",
            retry_after=min(self._health.unavailable_for(t.label) for t in run.plan.targets),
        )

    def _pick(self, run: _Run[T], *, first_at_model: bool = False) -> Target | None:
        """The next target: the first in the plan, not yet tried in this pass, that may answer
        and is in rotation (with `first_at_model`, only at a model not tried yet). When nothing in
        the whole plan is in rotation: once a request, the ejected one whose cooldown ends first;
        an upstream's Retry-After is always waited out."""
        health = self._health
        candidates = [
            t
            for t in run.plan.targets
            if t.label not in run.tried
            and run.may_answer(t)
            and not (first_at_model and t.model.id in run.models_tried)
        ]
        if run.too_small:
            candidates.sort(key=lambda t: _context_rank(t, run))
        for target in candidates:
            if health.available(target.label):
                return target
        if run.panic is not None:
            return None
        if any(health.available(t.label) for t in run.plan.targets if run.may_answer(t)):
            return None  # something is in rotation: this pass is over, not the plan
        ejected = [t for t in candidates if health.retry_after_for(t.label) <= 0]
        if not ejected:
            return None
        target = min(ejected, key=lambda t: health.unavailable_for(t.label))
        run.panic = target.label
        return target

    def _backoff(self, passes: int) -> float:
        r = self._routing
        cap = min(r.backoff_max_ms, r.backoff_base_ms * 2 ** (passes - 1))
        return self._rng.uniform(0, cap) / 1000


def _shape(target: Target) -> Shape:
    assert target.shape is not None, "a plan's targets carry their shape"
    return target.shape


def _deterministic(params: CompletionCreateParams) -> bool:
    """Whether asking the same deployment again gives the same answer (greedy, or seeded)."""
    return params.temperature == 0 or params.seed is not None


def _is_sick(exc: LlmrouterError) -> bool:
    """Failures that say something about the deployment (not about the request, not load)."""
    return (
        isinstance(exc, ProviderError)
        and exc.retryable
        and not isinstance(exc, UpstreamRateLimited | UpstreamRefused | InvalidOutput)
    )


def _context_rank(target: Target, run: _Run[T]) -> int:
    """After a prompt was too long: models known to have a larger context first, then those of
    unknown context, then the rest (stable, so plan order within each)."""
    failed = [
        t.model.context_length
        for t in run.plan.targets
        if t.model.id in run.too_small and t.model.context_length is not None
    ]
    size = target.model.context_length
    if size is None:
        return 1
    return 0 if not failed or size > max(failed) else 2


def _by(deadline: float, seconds: float) -> tuple[float, bool]:
    """The earlier of the request's deadline and `seconds` from now, in loop time; and whether it
    is the deadline."""
    limit = asyncio.get_running_loop().time() + seconds
    return (deadline, True) if deadline <= limit else (limit, False)


def _timeout(label: str, what: str, is_deadline: bool) -> UpstreamTimeout:
    if is_deadline:
        return DeadlineExceeded(f"The request's deadline passed while {label} was working.")
    return UpstreamTimeout(f"{label} {what}.")


def _produced(part: StreamPart) -> bool:
    """Whether a part has anything for the client: text, reasoning, a token (whose text may be
    empty: part of a character), or the end of a choice."""
    return any(
        c.text or c.reasoning or c.finish_reason is not None or (c.logprobs and c.logprobs.tokens)
        for c in part.choices
    )


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _settle(
    task: asyncio.Task[T],
    target: Target,
    discard: Callable[[Target, T], Awaitable[None]] | None,
    health: HealthBook,
) -> None:
    """Wait for a cancelled attempt to finish unwinding, and release what it opened. (Waiting
    with `asyncio.wait` leaves this task's own cancellation, if it comes, to propagate.)"""
    await asyncio.wait((task,))
    if task.cancelled() or task.exception() is not None:
        health.release(target.label)
        return
    health.record(target.label, True)  # it finished before the cancellation reached it
    if discard is not None:
        await discard(target, task.result())


async def _close(parts: object) -> None:
    closer = getattr(parts, "aclose", None)
    if closer is not None:
        await closer()
