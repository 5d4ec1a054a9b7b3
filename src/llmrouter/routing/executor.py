"""Executing a plan: the one place that makes attempts, retries, falls back, hedges and times out.

Walk the plan's targets in order, skipping deployments that are ejected or inside an upstream's
Retry-After, wherever they are in the plan. Only when nothing in the whole plan is in rotation does
a request try one anyway, once: the ejected deployment whose cooldown ends first (Envoy's panic
mode; its attempt is marked `panic`, and if it answers it is back in rotation at once). A retryable
failure moves on to the next target at once, as its class says (`errors.Next`: a prompt too long
for a model moves on to the request's other models; a content refusal or an upstream's 400 never
goes back to the same deployment); when a whole pass over the plan has failed, the next pass waits a
backoff with full jitter first.

The first attempt at each model the request names (its `model`, then each of `models`) is the
client's own instruction and costs nothing; every other attempt (another deployment of the same
model, a second pass, a hedge, asking again after an invalid answer) spends from the retry budget
shared by all requests (`routing/budget.py`). No attempt runs past the request's deadline.

With `hedge_after_ms` on the model, a first attempt that has produced nothing by then gets a second
one beside it, on the next target; the first to produce wins and the other is cancelled. Without
it, attempts are awaited in place: the common path spawns no task.

The commit point is the first byte for the client: a stream commits when its first part arrives.
After that a failure ends the stream (the API layer sends one error event), never a restart
elsewhere; a stream that stops without a finish reason for every choice is such a failure. Where
the request allows it and the model or the request asks for it, such a stream is continued on the
next deployment instead (`routing/resume.py`): that continuation is an attempt like any other.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import msgspec

from llmrouter.emulation.shape import Shape
from llmrouter.errors import (
    DeadlineExceeded,
    LlmrouterError,
    Next,
    ServiceUnavailable,
    UpstreamRateLimited,
)
from llmrouter.generation import Generation
from llmrouter.obs import tracing
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.routing.budget import RetryBudget
from llmrouter.routing.health import HealthBook
from llmrouter.routing.plan import Plan, Target
from llmrouter.routing.resume import Splice, first_limit, resumable
from llmrouter.routing.streams import (
    Attempt,
    CommittedStream,
    OpenStream,
    close,
    from_produced,
    limit_at,
    open_continuation,
    timed_out,
    until_produced,
)
from llmrouter.settings import RoutingSettings

__all__ = ["Executor"]

T = TypeVar("T")
# A stream's first batch (from its first part on), the rest, (if it can be continued elsewhere)
# its splice, and when its attempt began (`time.perf_counter`).
Opened = tuple[list[StreamPart], AsyncIterator[list[StreamPart]], Splice | None, float]
# An attempt: the target, its call, and the loop time by which it must be over.
AttemptFn = Callable[[Target, Call, float], Awaitable[T]]


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
        request: Generation,
        request_id: str,
        attempt: AttemptFn[T],
        discard: Callable[[Target, T], Awaitable[None]] | None,
        deadline: float,
        health: HealthBook,
        resume: bool | None = None,
    ) -> None:
        self.health = health
        self.plan = plan
        self.request = request
        self.resume = resume  # the request's own word on continuing a cut stream (None: the model's)
        self.request_id = request_id
        self.attempt = attempt
        self.discard = discard
        self.deadline = deadline  # loop time
        self.attempts: list[Attempt] = []
        self.streaming = -1  # the attempt a committed stream is on, in `attempts`
        self.running: list[_Running[T]] = []  # hedged attempts in flight
        self.tried: set[str] = set()  # in the current pass over the plan
        self.models_tried: set[str] = set()  # a first attempt at these costs the budget nothing
        self.panicked = False  # a request tries one deployment in panic mode, once
        self.panic: str | None = None  # the deployment of that attempt, until its outcome
        self.too_small: set[str] = set()  # models whose context the request does not fit
        self.refused: set[str] = set()  # deployments whose content policy refused it
        self.invalid: dict[str, int] = {}  # answers that failed response_format, per deployment
        self.again: Target | None = None  # ask this one again (its answer was invalid)
        self.passes = 0
        self.started = 0
        self.last_error: LlmrouterError | None = None
        self.winner: tuple[Target, T] | None = None
        self.stop = False

    def forget_attempts(self) -> None:
        """The plan's attempts are over (one won, or the last failed): what made them goes. The
        attempt functions close over the run, and the winner may hold a splice that holds it:
        cycles that would keep a request's plan, shapes and stream until the cyclic collector
        ran. (A stream continued elsewhere uses the run again, but never these.)"""
        self.attempt = _settled
        self.discard = None
        self.winner = None

    def begin(self, target: Target) -> None:
        """An attempt at `target` starts now."""
        if target.label != self.panic:  # (a panic attempt is no probe: it fails as ejected)
            self.health.claim(target.label)
        self.tried.add(target.label)
        self.models_tried.add(target.model.id)
        self.started += 1

    def start(self, target: Target) -> Awaitable[T]:
        self.begin(target)
        call = Call(target.deployment, _shape(target).request, target.provider.timeouts, self.request_id)
        work = self.attempt(target, call, self.deadline)
        return tracing.attempt(target, work) if tracing.enabled() else work

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
        left), wait for them to unwind, and release what they opened: all of it, even when this
        task is cancelled meanwhile (its cancellation is raised after, not lost)."""
        running, self.running = self.running, []
        for r in running:
            r.task.cancel()
        for r in running:
            self.attempts.append(Attempt(r.target.label, "cancelled", _ms(r.started)))
        cancelled: asyncio.CancelledError | None = None
        for r in running:
            while not r.task.done():  # (an attempt unwinds in bounded time once cancelled)
                try:
                    await asyncio.wait((r.task,))
                except asyncio.CancelledError as exc:
                    cancelled = exc
        for r in running:
            try:
                await self._settle(r.task, r.target)
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            raise cancelled

    async def drop_winner(self) -> None:
        """An answer that won but that nobody will take (the request was cancelled as it came):
        released as a hedge's that came too late is."""
        winner, self.winner = self.winner, None
        if winner is not None and self.discard is not None:
            await self.discard(*winner)

    async def _settle(self, task: asyncio.Task[T], target: Target) -> None:
        """Release what a cancelled attempt that has finished unwinding opened."""
        if task.cancelled() or task.exception() is not None:
            self.release(target)
            self.over(target)
            return
        self.health.record(target.label, True)  # it finished before the cancellation reached it
        self.over(target)
        if self.discard is not None:
            await self.discard(target, task.result())

    def release(self, target: Target) -> None:
        """An attempt at `target` ended saying nothing about it: if it was the probe, another
        may probe. (A panic attempt was no probe, and must not free the probe's claim.)"""
        if target.label != self.panic:
            self.health.release(target.label)

    def over(self, target: Target) -> None:
        """The outcome of an attempt at `target` has been taken in: if it was the panic
        attempt, later attempts there (a probe, once its cooldown ends) are ordinary ones."""
        if target.label == self.panic:
            self.panic = None


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
        self, plan: Plan, request: Generation, request_id: str
    ) -> tuple[Target, Completion, list[Attempt]]:
        health = self._health

        async def attempt(target: Target, call: Call, deadline: float) -> Completion:
            label = target.label
            started = time.perf_counter()
            health.started(label)
            limit, is_deadline = limit_at(deadline, call.timeouts.total)
            try:
                async with asyncio.timeout_at(limit):
                    result = await _shape(target).complete(target.provider, call)
            except TimeoutError:
                raise timed_out(label, "did not finish in time", is_deadline) from None
            finally:
                health.finished(label)
            elapsed = time.perf_counter() - started
            health.observe_latency(label, elapsed)
            if result.usage.completion_tokens and elapsed > 0:
                health.observe_throughput(label, result.usage.completion_tokens / elapsed)
            return result

        run = self._new_run(plan, request, request_id, attempt)
        target, result = await self._run(run)
        return target, result, run.attempts

    async def open_stream(
        self, plan: Plan, request: Generation, request_id: str, *, resume: bool | None = None
    ) -> OpenStream:
        """`resume`: the request's own word on continuing a cut stream (None: the model's)."""
        health = self._health
        can_resume = resumable(request)
        run: _Run[Opened]

        async def attempt(target: Target, call: Call, deadline: float) -> Opened:
            started = time.perf_counter()
            health.started(target.label)
            shape = _shape(target)
            splice = None
            if can_resume and not shape.buffered and _resumes(run, target):
                cap = first_limit(request, target.capabilities.default_max_tokens)
                if cap is not None and call.request.max_tokens != cap:  # what the seam counts from
                    capped = msgspec.structs.replace(call.request, max_tokens=cap)
                    call = msgspec.structs.replace(call, request=capped)
                resume_at = functools.partial(self._continue, run)
                splice = Splice(target, cap, resume_at, functools.partial(self._broke_off, run))
            parts = aiter(shape.stream(splice or target.provider, call))
            # A stream served from a complete answer has its first part when the answer is done.
            wait = call.timeouts.total if shape.buffered else call.timeouts.first_token
            try:  # (parts with nothing for the client yet do not commit it, and are dropped)
                first = from_produced(await until_produced(parts, target.label, deadline, wait))
            except BaseException:
                health.finished(target.label)
                raise
            health.observe_latency(target.label, time.perf_counter() - started)
            return first, parts, splice, started

        async def discard(target: Target, opened: Opened) -> None:
            health.finished(target.label)
            await close(opened[1])

        run = self._new_run(plan, request, request_id, attempt, discard, resume)
        target, (first, parts, splice, started) = await self._run(run)
        if splice is not None:
            splice.committed = True
        rest = CommittedStream(health, target, first, parts, run.deadline, splice, started)
        return OpenStream(target, first, rest, run.attempts)

    # -- the way through a plan ---------------------------------------------------------------

    def _new_run(
        self,
        plan: Plan,
        request: Generation,
        request_id: str,
        attempt: AttemptFn[T],
        discard: Callable[[Target, T], Awaitable[None]] | None = None,
        resume: bool | None = None,
    ) -> _Run[T]:
        """A request's way through `plan`, with its deadline (loop time) from now; `discard`
        releases a result that came in too late (a hedge that also produced)."""
        self._budget.deposit()
        deadline = asyncio.get_running_loop().time() + self._routing.deadline_seconds
        return _Run(plan, request, request_id, attempt, discard, deadline, self._health, resume)

    async def _run(self, run: _Run[T]) -> tuple[Target, T]:
        """Attempts until one succeeds, or the request's deadline."""
        plan = run.plan
        hedge_ms = plan.targets[0].model.hedge_after_ms
        target: Target | None = self._first_target(run)
        answered = False
        try:
            while target is not None:
                if hedge_ms is None:
                    await self._attempt(run, target)
                else:
                    await self._race(run, target, hedge_ms / 1000)
                if run.winner is not None:
                    answered = True
                    return run.winner
                if run.stop:
                    break
                target = await self._next(run)
        finally:
            try:
                await run.cancel_running()
            except BaseException:
                answered = False  # (cancelled while the others unwound: the answer is not taken)
                raise
            finally:
                if not answered:
                    await run.drop_winner()
                run.forget_attempts()
        assert run.last_error is not None
        _raise_last(run)

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
                    room = run.started < self._routing.max_attempts
                    nxt = self._pick(run, panic=False) if room else None  # (no hedge on the out)
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

    # -- continuing a cut stream (routing/resume.py) -------------------------------------------

    async def _continue(
        self,
        run: _Run[Opened],
        failed: Target,
        exc: LlmrouterError,
        text: str,
        tokens: int,
        began: float,
        limit: int | None,
    ) -> tuple[Target, AsyncIterator[list[StreamPart]]]:
        """`failed` broke off a committed stream with `exc` after sending `text` (`tokens`
        tokens): judge the failure, then continue the answer (at most `limit` tokens more) on the
        next deployment of the plan that starts, within the request's attempts, budget and
        deadline. Raises the last failure when the stream cannot go on."""
        health = self._health
        self._broke_off(run, failed, exc, began)
        if not exc.retryable or run.stop or not _resumes(run, failed):
            raise exc
        prompt = run.request.prompts[0]
        assert isinstance(prompt, str), "only a string prompt is resumed"
        prompt += text
        # A chat API sent the text so far would answer it as a message, not go on with it: none
        # is a place to continue (nor costs the budget, nor comes back on a later pass).
        run.refused.update(t.label for t in run.plan.targets if t.capabilities.chat)
        while (target := await self._next(run)) is not None:
            shape = _shape(target)
            request = msgspec.structs.replace(shape.request, prompts=(prompt,), max_tokens=limit)
            call = Call(target.deployment, request, target.provider.timeouts, run.request_id)
            run.begin(target)
            health.started(target.label)
            started = time.perf_counter()
            try:
                parts = await open_continuation(target, call, run.deadline)
            except LlmrouterError as failure:
                health.finished(target.label)
                self._failed(run, target, failure, _ms(started))
                if run.stop:
                    break
                continue
            except BaseException:  # cancelled: the client left, or the request's deadline
                health.finished(target.label)
                run.release(target)
                run.over(target)
                run.attempts.append(Attempt(target.label, "cancelled", _ms(started)))
                raise
            run.streaming = len(run.attempts)
            note = f"resumed {run.note(target)}".rstrip()
            run.attempts.append(Attempt(target.label, "ok", _ms(started), note))
            health.record(target.label, True)
            if target.label == run.panic:
                health.restore(target.label)
            run.over(target)
            health.finished(failed.label)
            return target, parts
        if run.last_error is None:
            run.last_error = exc.with_traceback(None)
        _raise_last(run)

    def _broke_off(self, run: _Run[Opened], failed: Target, exc: LlmrouterError, began: float) -> None:
        """The committed attempt at `failed` ended in `exc`: its entry in the attempts says so,
        and the failure is judged like any other."""
        entry = run.attempts[run.streaming]
        run.attempts[run.streaming] = Attempt(failed.label, exc.code, _ms(began), entry.note)
        self._judge(run, failed, exc)

    def _won(self, run: _Run[T], target: Target, result: T, ms: float) -> None:
        run.streaming = len(run.attempts)
        run.attempts.append(Attempt(target.label, "ok", ms, run.note(target)))
        self._health.record(target.label, True)
        if target.label == run.panic:
            self._health.restore(target.label)
        run.over(target)
        run.winner = target, result

    def _failed(self, run: _Run[T], target: Target, exc: LlmrouterError, ms: float) -> None:
        run.attempts.append(Attempt(target.label, exc.code, ms, run.note(target)))
        self._judge(run, target, exc)
        run.over(target)

    def _judge(self, run: _Run[T], target: Target, exc: LlmrouterError) -> None:
        """What a failure says about the deployment (its health) and about the rest of the
        request's way: the error's class says both (`blames_deployment`, `next`)."""
        wait = exc.retry_after
        if not wait and isinstance(exc, UpstreamRateLimited):  # "later", without saying when
            wait = self._routing.health.rate_limit_skip_seconds
        if exc.retryable and wait:  # the upstream said when to come back
            self._health.skip_for(target.label, wait)
            run.release(target)
        elif exc.blames_deployment:
            if target.label != run.panic:  # (it is out already; a probe's outcome decides)
                self._health.record(target.label, False)
        else:  # about the request, not the deployment
            run.release(target)
        # Without its traceback: that holds the attempt's frame, which holds `run`, which would
        # hold the error, in a cycle only the cyclic collector frees (with the request's prompt).
        run.last_error = exc.with_traceback(None)
        next_ = exc.next
        if next_ is Next.OTHER_MODEL:
            run.too_small.add(target.model.id)  # the request's other models may fit it
        elif next_ is Next.OTHER_DEPLOYMENT:
            run.refused.add(target.label)  # asking it again would get the same answer
        elif next_ is Next.SAME_AGAIN:
            count = run.invalid[target.label] = run.invalid.get(target.label, 0) + 1
            if count <= self._routing.invalid_output_retries and not _deterministic(run.request):
                run.again = target
            else:  # asked again, it would say the same: on to the next deployment
                run.refused.add(target.label)
        elif next_ is Next.STOP:
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

    def _pick(self, run: _Run[T], *, first_at_model: bool = False, panic: bool = True) -> Target | None:
        """The next target: the first in the plan, not yet tried in this pass, that may answer
        and is in rotation (with `first_at_model`, only at a model not tried yet). When nothing in
        the whole plan is in rotation (and `panic`): once a request, the ejected one whose
        cooldown ends first; an upstream's Retry-After is always waited out."""
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
        if run.panicked or not panic:
            return None
        if any(health.available(t.label) for t in run.plan.targets if run.may_answer(t)):
            return None  # something is in rotation: this pass is over, not the plan
        ejected = [t for t in candidates if health.retry_after_for(t.label) <= 0]
        if not ejected:
            return None
        target = min(ejected, key=lambda t: health.unavailable_for(t.label))
        run.panicked, run.panic = True, target.label
        return target

    def _backoff(self, passes: int) -> float:
        r = self._routing
        cap = min(r.backoff_max_ms, r.backoff_base_ms * 2 ** (passes - 1))
        return self._rng.uniform(0, cap) / 1000


async def _settled(target: Target, call: Call, deadline: float) -> Any:
    raise AssertionError("a settled run makes no more attempts")


def _resumes(run: _Run[T], target: Target) -> bool:
    """Whether a stream of `target` that fails mid-way is continued: the request says, or else
    the model's `resume_streams`. Never to or from a chat API, which would answer the text so far
    as a message rather than go on with it."""
    if target.capabilities.chat:
        return False
    if run.resume is not None:
        return run.resume
    return target.model.resume_streams


def _shape(target: Target) -> Shape:
    assert target.shape is not None, "a plan's targets carry their shape"
    return target.shape


def _deterministic(request: Generation) -> bool:
    """Whether asking the same deployment again gives the same answer (greedy, or seeded)."""
    return request.temperature == 0 or request.seed is not None


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


def _raise_last(run: _Run[Any]) -> NoReturn:
    """Raise the run's last error with its attempts, leaving no reference to it behind in the run
    or this frame (the traceback it is raised with holds the frame)."""
    error, run.last_error = run.last_error, None
    assert error is not None
    error.attempts = run.attempts
    try:
        raise error
    finally:
        del error


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
