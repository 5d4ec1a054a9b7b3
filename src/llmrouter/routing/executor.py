"""Executing a plan: the one place that makes attempts, retries, falls back, hedges and times out.

Walk the plan's targets in order, skipping deployments that are ejected or inside an upstream's
Retry-After. A retryable failure moves on to the next target at once (a prompt too long for a model
moves on to the request's other models; a content refusal never goes back to the same deployment);
when a whole pass over the plan has failed, the next pass waits a backoff with full jitter first.
Every attempt after the first spends from a retry budget shared by all requests, and none runs past
the request's deadline.

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

from llmrouter.errors import (
    ContextLengthExceeded,
    LlmrouterError,
    ProviderError,
    ServiceUnavailable,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.routing.health import HealthBook, RetryBudget
from llmrouter.routing.plan import Plan, Target
from llmrouter.settings import RoutingSettings
from llmrouter.wire.completions import CompletionCreateParams
from llmrouter.wire.validate import Prompts

__all__ = ["Attempt", "Executor", "OpenStream"]

T = TypeVar("T")
Opened = tuple[StreamPart, AsyncIterator[StreamPart]]
# An attempt: the target, its call, and the loop time by which it must be over.
AttemptFn = Callable[[Target, Call, float], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class Attempt:
    target: str
    outcome: str  # "ok", "cancelled" (a hedge that lost), or the error's code
    ms: float

    def __str__(self) -> str:
        return f"{self.target} {self.outcome} {self.ms:.0f}ms"


@dataclass(slots=True)
class OpenStream:
    """A stream that has produced its first part: committed to `target`."""

    target: Target
    first: StreamPart
    rest: AsyncIterator[StreamPart]
    attempts: list[Attempt] = field(default_factory=list)


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
        self.too_small: set[str] = set()  # models whose context the request does not fit
        self.refused: set[str] = set()  # deployments whose content policy refused it
        self.passes = 0
        self.started = 0
        self.last_error: LlmrouterError | None = None
        self.winner: tuple[Target, T] | None = None
        self.stop = False

    def start(self, target: Target) -> Awaitable[T]:
        self.health.claim(target.label)
        self.tried.add(target.label)
        self.started += 1
        call = Call(
            target.deployment, self.params, self.prompts, target.provider.timeouts, self.request_id
        )
        return self.attempt(target, call, self.deadline)

    def launch(self, target: Target) -> None:
        task = asyncio.ensure_future(self.start(target))
        self.running.append(_Running(target, time.perf_counter(), task))

    def nothing_left(self) -> bool:
        return all(t.model.id in self.too_small or t.label in self.refused for t in self.plan.targets)

    async def cancel_running(self) -> None:
        """Cancel the attempts still in flight (a hedge that lost, or all of them when the client
        left), wait for them to unwind, and release what they opened."""
        for r in self.running:
            r.task.cancel()
        for r in self.running:
            self.attempts.append(Attempt(r.target.label, "cancelled", _ms(r.started)))
            await _settle(r.task, r.target, self.discard)
        self.running.clear()


class Executor:
    def __init__(
        self,
        routing: RoutingSettings,
        health: HealthBook,
        rng: random.Random | None = None,
    ) -> None:
        self._routing = routing
        self._health = health
        self._budget = RetryBudget(routing.retry_budget_ratio, routing.retry_budget_floor)
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
            try:
                async with asyncio.timeout_at(_by(deadline, call.timeouts.total)):
                    result = await target.provider.complete(call)
            except TimeoutError:
                raise UpstreamTimeout(f"{label} did not finish in time.") from None
            finally:
                health.finished(label)
            elapsed = time.perf_counter() - started
            health.observe_latency(label, elapsed)
            if result.usage.completion_tokens and elapsed > 0:
                health.observe_throughput(label, result.usage.completion_tokens / elapsed)
            return result

        return await self._run(plan, params, prompts, request_id, attempt)

    async def open_stream(
        self, plan: Plan, params: CompletionCreateParams, prompts: Prompts, request_id: str
    ) -> OpenStream:
        health = self._health

        async def attempt(target: Target, call: Call, deadline: float) -> Opened:
            started = time.perf_counter()
            health.started(target.label)
            parts = aiter(target.provider.stream(call))
            try:
                async with asyncio.timeout_at(_by(deadline, call.timeouts.first_token)):
                    first = await anext(parts)
            except BaseException as exc:
                health.finished(target.label)
                await _close(parts)
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(f"{target.label} produced no token in time.") from None
                if isinstance(exc, StopAsyncIteration):
                    raise UpstreamUnavailable(f"{target.label} ended without an answer.") from None
                raise
            health.observe_latency(target.label, time.perf_counter() - started)
            return first, parts

        async def discard(target: Target, opened: Opened) -> None:
            health.finished(target.label)
            await _close(opened[1])

        target, (first, parts), attempts = await self._run(
            plan, params, prompts, request_id, attempt, discard
        )
        return OpenStream(target, first, self._watch(target, first, parts), attempts)

    async def _watch(
        self, target: Target, first: StreamPart, parts: AsyncIterator[StreamPart]
    ) -> AsyncIterator[StreamPart]:
        """The rest of a committed stream; a failure, or an end without every choice's finish
        reason, is raised to the API layer and counts against the deployment."""
        label = target.label
        open_choices = {c.index for c in first.choices if c.finish_reason is None}
        started = time.perf_counter()
        try:
            async for part in parts:
                for choice in part.choices:
                    if choice.finish_reason is None:
                        open_choices.add(choice.index)
                    else:
                        open_choices.discard(choice.index)
                if part.usage is not None and part.usage.completion_tokens:
                    elapsed = time.perf_counter() - started
                    if elapsed > 0:
                        self._health.observe_throughput(label, part.usage.completion_tokens / elapsed)
                yield part
            if open_choices:
                raise UpstreamUnavailable(
                    f"{label} ended the stream without a finish reason for choice {min(open_choices)}."
                )
        except LlmrouterError as exc:
            if _is_sick(exc):
                self._health.record(label, False)
            raise
        finally:
            self._health.finished(label)
            await _close(parts)

    # -- the way through a plan ---------------------------------------------------------------

    async def _run(
        self,
        plan: Plan,
        params: CompletionCreateParams,
        prompts: Prompts,
        request_id: str,
        attempt: AttemptFn[T],
        discard: Callable[[Target, T], Awaitable[None]] | None = None,
    ) -> tuple[Target, T, list[Attempt]]:
        """Attempts until one succeeds; `discard` releases a result that came in too late (a
        hedge that also produced)."""
        self._budget.note_request()
        deadline = asyncio.get_running_loop().time() + self._routing.deadline_seconds
        run = _Run(plan, params, prompts, request_id, attempt, discard, deadline, self._health)
        hedge_ms = plan.targets[0].model.hedge_after_ms
        target: Target | None = self._first_target(plan)
        try:
            while target is not None:
                if hedge_ms is None:
                    await self._attempt(run, target)
                else:
                    await self._race(run, target, hedge_ms / 1000)
                if run.winner is not None:
                    return run.winner[0], run.winner[1], run.attempts
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
                    run.last_error = UpstreamTimeout("The request's deadline passed.")
                    run.stop = True
                elif not hedged:
                    hedged = True
                    nxt = self._pick(run) if run.started < self._routing.max_attempts else None
                    if nxt is not None and self._budget.try_spend():
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
                elif run.discard is not None:
                    await run.discard(finished.target, result)

    async def _next(self, run: _Run[T]) -> Target | None:
        """After a failure: the next target of this pass, or of a new pass after a backoff; None
        when the attempts, the budget, the deadline or the plan are used up."""
        if run.started >= self._routing.max_attempts or run.nothing_left():
            return None
        nxt = self._pick(run)
        if nxt is None:
            run.passes += 1
            run.tried.clear()
            delay = self._backoff(run.passes)
            if asyncio.get_running_loop().time() + delay >= run.deadline:
                return None
            await asyncio.sleep(delay)
            nxt = self._pick(run)
            if nxt is None:
                return None
        if not self._budget.try_spend():
            run.attempts.append(Attempt(nxt.label, "retry_budget_exhausted", 0.0))
            return None
        return nxt

    def _won(self, run: _Run[T], target: Target, result: T, ms: float) -> None:
        run.attempts.append(Attempt(target.label, "ok", ms))
        self._health.record(target.label, True)
        run.winner = target, result

    def _failed(self, run: _Run[T], target: Target, exc: LlmrouterError, ms: float) -> None:
        run.attempts.append(Attempt(target.label, exc.code, ms))
        if isinstance(exc, UpstreamRateLimited) and exc.retry_after:
            self._health.skip_for(target.label, exc.retry_after)
        elif _is_sick(exc):
            self._health.record(target.label, False)
        run.last_error = exc
        if isinstance(exc, ContextLengthExceeded):
            run.too_small.add(target.model.id)  # the request's other models may fit it
        elif isinstance(exc, UpstreamRefused):
            run.refused.add(target.label)  # asking it again would be refused again
        elif not exc.retryable:
            run.stop = True

    # -- choosing -----------------------------------------------------------------------------

    def _first_target(self, plan: Plan) -> Target:
        for target in plan.targets:
            if self._health.available(target.label):
                return target
        # Nothing is available. Deployments that are merely ejected still serve, rather than
        # leave a model with none at all; those inside an upstream's Retry-After wait.
        for target in plan.targets:
            if self._health.retry_after_for(target.label) == 0:
                return target
        labels = ", ".join(t.label for t in plan.targets)
        raise ServiceUnavailable(
            f"Every deployment that could serve this request asked to wait ({labels}).",
            retry_after=min(self._health.unavailable_for(t.label) for t in plan.targets),
        )

    def _pick(self, run: _Run[T]) -> Target | None:
        candidates = [
            t
            for t in run.plan.targets
            if t.label not in run.tried
            and t.label not in run.refused
            and t.model.id not in run.too_small
        ]
        if run.too_small:
            candidates.sort(key=lambda t: _context_rank(t, run))
        for target in candidates:
            if self._health.available(target.label):
                return target
        return None

    def _backoff(self, passes: int) -> float:
        r = self._routing
        cap = min(r.backoff_max_ms, r.backoff_base_ms * 2 ** (passes - 1))
        return self._rng.uniform(0, cap) / 1000


def _is_sick(exc: LlmrouterError) -> bool:
    """Failures that say something about the deployment (not about the request, not load)."""
    return (
        isinstance(exc, ProviderError)
        and exc.retryable
        and not isinstance(exc, UpstreamRateLimited | UpstreamRefused)
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


def _by(deadline: float, seconds: float) -> float:
    """The earlier of the request's deadline and `seconds` from now, in loop time."""
    return min(deadline, asyncio.get_running_loop().time() + seconds)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _settle(
    task: asyncio.Task[T],
    target: Target,
    discard: Callable[[Target, T], Awaitable[None]] | None,
) -> None:
    """Wait for a cancelled attempt to finish unwinding, and release what it opened."""
    try:
        result = await task
    except BaseException:  # its outcome no longer matters
        return
    if discard is not None:  # it finished before the cancellation reached it
        await discard(target, result)


async def _close(parts: object) -> None:
    closer = getattr(parts, "aclose", None)
    if closer is not None:
        await closer()
