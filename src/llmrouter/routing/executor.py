"""Executing a plan: the one place that makes attempts, moves to the next deployment, and times out.

Before the commit point (the first byte for the client) any retryable failure moves on to the next
target silently. A streamed answer commits when its first part arrives: after that, a failure is the
stream's end, never a restart elsewhere (that would duplicate text).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmrouter.errors import LlmrouterError, ServiceUnavailable, UpstreamTimeout
from llmrouter.providers.base import Call, Completion, StreamPart
from llmrouter.routing.plan import Plan, Target
from llmrouter.wire.completions import CompletionCreateParams
from llmrouter.wire.validate import Prompts

__all__ = ["Attempt", "Executor", "OpenStream"]


@dataclass(frozen=True, slots=True)
class Attempt:
    target: str
    outcome: str  # "ok" or the error code
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


class Executor:
    async def complete(
        self, plan: Plan, params: CompletionCreateParams, prompts: Prompts, request_id: str
    ) -> tuple[Target, Completion, list[Attempt]]:
        attempts: list[Attempt] = []
        last_error: LlmrouterError | None = None
        for target in self._usable(plan):
            call = self._call(target, params, prompts, request_id)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(call.timeouts.total):
                    result = await target.provider.complete(call)
            except TimeoutError:
                last_error = UpstreamTimeout(f"{target.label} did not finish in time.")
            except LlmrouterError as exc:
                last_error = exc
            else:
                attempts.append(Attempt(target.label, "ok", _ms(started)))
                return target, result, attempts
            attempts.append(Attempt(target.label, last_error.code, _ms(started)))
            if not last_error.retryable:
                break
        raise self._exhausted(last_error, attempts)

    async def open_stream(
        self, plan: Plan, params: CompletionCreateParams, prompts: Prompts, request_id: str
    ) -> OpenStream:
        attempts: list[Attempt] = []
        last_error: LlmrouterError | None = None
        for target in self._usable(plan):
            call = self._call(target, params, prompts, request_id)
            started = time.perf_counter()
            parts = aiter(target.provider.stream(call))
            try:
                async with asyncio.timeout(call.timeouts.first_token):
                    first = await anext(parts)
            except TimeoutError:
                last_error = UpstreamTimeout(f"{target.label} produced no token in time.")
            except StopAsyncIteration:
                last_error = ServiceUnavailable(f"{target.label} ended without an answer.")
            except LlmrouterError as exc:
                last_error = exc
            else:
                attempts.append(Attempt(target.label, "ok", _ms(started)))
                return OpenStream(target, first, parts, attempts)
            await _close(parts)
            attempts.append(Attempt(target.label, last_error.code, _ms(started)))
            if not last_error.retryable:
                break
        raise self._exhausted(last_error, attempts)

    @staticmethod
    def _usable(plan: Plan) -> list[Target]:
        usable = [t for t in plan.targets if t.provider.usable(t.deployment)]
        if not usable:
            labels = ", ".join(t.label for t in plan.targets)
            raise ServiceUnavailable(
                f"No deployment is ready to serve this request ({labels}); try again shortly.",
                retry_after=1,
            )
        return usable

    @staticmethod
    def _call(target: Target, params: CompletionCreateParams, prompts: Prompts, request_id: str) -> Call:
        return Call(target.deployment, params, prompts, target.provider.timeouts, request_id)

    @staticmethod
    def _exhausted(error: LlmrouterError | None, attempts: list[Attempt]) -> LlmrouterError:
        assert error is not None
        error.attempts = [str(a) for a in attempts]
        return error


async def _close(parts: AsyncIterator[StreamPart]) -> None:
    closer = getattr(parts, "aclose", None)
    if closer is not None:
        await closer()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
