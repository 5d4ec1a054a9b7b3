"""Executing a plan: the one place that makes attempts, retries, falls back, hedges and times out.

Walk the plan's targets in order, skipping deployments that are ejected or inside an upstream's
Retry-After. A retryable failure moves on to the next target at once (a prompt too long for a model
moves on to the request's other models); when a whole pass over the
plan has failed, the next pass waits a backoff with full jitter first. Every attempt after the first
spends from a retry budget shared by all requests, and none starts past the request's deadline.

With `hedge_after_ms` on the model, a first attempt that has produced nothing by then gets a second
one beside it, on the next target; the first to produce wins and the other is cancelled.

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
        async def attempt(target: Target, call: Call) -> Completion:
            started = time.perf_counter()
            self._health.started(target.label)
            try:
                async with asyncio.timeout(call.timeouts.total):
                    result = await target.provider.complete(call)
            except TimeoutError:
                raise UpstreamTimeout(f"{target.label} did not finish in time.") from None
            finally:
                self._health.finished(target.label)
            elapsed = time.perf_counter() - started
            self._health.observe_latency(target.label, elapsed)
            if result.usage.completion_tokens and elapsed > 0:
                self._health.observe_throughput(target.label, result.usage.completion_tokens / elapsed)
            return result

        return await self._run(plan, params, prompts, request_id, attempt)

    async def open_stream(
        self, plan: Plan, params: CompletionCreateParams, prompts: Prompts, request_id: str
    ) -> OpenStream:
        async def attempt(target: Target, call: Call) -> tuple[StreamPart, AsyncIterator[StreamPart]]:
            started = time.perf_counter()
            self._health.started(target.label)
            parts = aiter(target.provider.stream(call))
            try:
                async with asyncio.timeout(call.timeouts.first_token):
                    first = await anext(parts)
            except BaseException as exc:
                self._health.finished(target.label)
                await _close(parts)
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(f"{target.label} produced no token in time.") from None
                if isinstance(exc, StopAsyncIteration):
                    raise UpstreamUnavailable(f"{target.label} ended without an answer.") from None
                raise
            self._health.observe_latency(target.label, time.perf_counter() - started)
            return first, parts

        async def discard(target: Target, opened: tuple[StreamPart, AsyncIterator[StreamPart]]) -> None:
            self._health.finished(target.label)
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

    # -- attempts -----------------------------------------------------------------------------

    async def _run(
        self,
        plan: Plan,
        params: CompletionCreateParams,
        prompts: Prompts,
        request_id: str,
        attempt: Callable[[Target, Call], Awaitable[T]],
        discard: Callable[[Target, T], Awaitable[None]] | None = None,
    ) -> tuple[Target, T, list[Attempt]]:
        """Attempts until one succeeds; `discard` releases a result that came in too late (a
        hedge that also produced)."""
        routing = self._routing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + routing.deadline_seconds
        hedge_ms = plan.targets[0].model.hedge_after_ms
        hedge_after = hedge_ms / 1000 if hedge_ms is not None else None
        self._budget.note_request()
        attempts: list[Attempt] = []
        running: list[_Running[T]] = []
        tried: set[str] = set()  # in the current pass over the plan
        too_small: set[str] = set()  # models whose context the request does not fit
        refused: set[str] = set()  # deployments whose content policy refused the request
        passes = 0
        started = 0
        last_error: LlmrouterError | None = None
        winner: tuple[Target, T] | None = None

        def launch(target: Target) -> None:
            nonlocal started
            call = Call(target.deployment, params, prompts, target.provider.timeouts, request_id)
            task = asyncio.ensure_future(attempt(target, call))
            running.append(_Running(target, time.perf_counter(), task))
            tried.add(target.label)
            started += 1

        launch(self._first_target(plan))
        try:
            while running and winner is None:
                wait = deadline - loop.time()
                if hedge_after is not None and len(running) == 1:
                    elapsed = time.perf_counter() - running[0].started
                    wait = min(wait, hedge_after - elapsed)
                done, _ = await asyncio.wait(
                    [r.task for r in running],
                    timeout=max(wait, 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    if loop.time() >= deadline:
                        last_error = UpstreamTimeout("The request's deadline passed.")
                        break
                    nxt = (
                        self._pick(plan, tried | refused, too_small)
                        if started < routing.max_attempts
                        else None
                    )
                    if nxt is not None and self._budget.try_spend():
                        launch(nxt)  # the hedge
                    else:
                        hedge_after = None  # nothing to hedge with: just wait
                    continue
                stop = False
                for finished in [r for r in running if r.task in done]:
                    running.remove(finished)
                    ms = (time.perf_counter() - finished.started) * 1000
                    label = finished.target.label
                    try:
                        result = finished.task.result()
                    except LlmrouterError as exc:
                        attempts.append(Attempt(label, exc.code, ms))
                        self._learn(label, exc)
                        last_error = exc
                        if isinstance(exc, ContextLengthExceeded):
                            too_small.add(finished.target.model.id)  # the others may fit it
                        elif isinstance(exc, UpstreamRefused):
                            refused.add(label)  # asking it again would be refused again
                        else:
                            stop = stop or not exc.retryable
                        continue
                    if winner is None:
                        attempts.append(Attempt(label, "ok", ms))
                        self._health.record(label, True)
                        winner = finished.target, result
                    elif discard is not None:
                        await discard(finished.target, result)
                if stop or winner is not None:
                    break
                if running:
                    continue  # a hedge is still on its way
                # Every attempt so far has failed: the next target, or a new pass after a backoff.
                if started >= routing.max_attempts:
                    break
                if all(t.model.id in too_small or t.label in refused for t in plan.targets):
                    break
                nxt = self._pick(plan, tried | refused, too_small)
                if nxt is None:
                    passes += 1
                    tried.clear()
                    delay = self._backoff(passes)
                    if loop.time() + delay >= deadline:
                        break
                    await asyncio.sleep(delay)
                    nxt = self._pick(plan, tried | refused, too_small)
                    if nxt is None:
                        break
                if not self._budget.try_spend():
                    attempts.append(Attempt(nxt.label, "retry_budget_exhausted", 0.0))
                    break
                launch(nxt)
        finally:
            for r in running:
                r.task.cancel()
            for r in running:
                attempts.append(
                    Attempt(r.target.label, "cancelled", (time.perf_counter() - r.started) * 1000)
                )
                await _settle(r.task, r.target, discard)
        if winner is not None:
            return winner[0], winner[1], attempts
        assert last_error is not None
        last_error.attempts = [str(a) for a in attempts]
        raise last_error

    def _first_target(self, plan: Plan) -> Target:
        target = self._pick(plan, set())
        if target is not None:
            return target
        # Nothing is available. Deployments that are merely ejected still serve, rather than
        # leave a model with none at all; those inside an upstream's Retry-After wait.
        waiting = [(self._health.unavailable_for(t.label), t) for t in plan.targets]
        ejected = [t for t in plan.targets if self._health.retry_after_for(t.label) == 0]
        if ejected:
            return ejected[0]
        labels = ", ".join(t.label for t in plan.targets)
        raise ServiceUnavailable(
            f"Every deployment that could serve this request asked to wait ({labels}).",
            retry_after=min(w for w, _ in waiting),
        )

    def _pick(self, plan: Plan, tried: set[str], too_small: set[str] | None = None) -> Target | None:
        for target in plan.targets:
            if target.label in tried or (too_small and target.model.id in too_small):
                continue
            if self._health.available(target.label):
                return target
        return None

    def _learn(self, label: str, exc: LlmrouterError) -> None:
        if isinstance(exc, UpstreamRateLimited) and exc.retry_after:
            self._health.skip_for(label, exc.retry_after)
        elif _is_sick(exc):
            self._health.record(label, False)

    def _backoff(self, passes: int) -> float:
        r = self._routing
        cap = min(r.backoff_max_ms, r.backoff_base_ms * 2 ** (passes - 1))
        return self._rng.uniform(0, cap) / 1000


def _is_sick(exc: LlmrouterError) -> bool:
    """Failures that say something about the deployment (not about the request, not load)."""
    return isinstance(exc, ProviderError) and exc.retryable and not isinstance(exc, UpstreamRateLimited)


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
