"""The executor in process, against a scripted provider: the moments that take several requests
to line up exactly (a probe and a panic attempt in flight together), in milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from llmrouter.errors import UpstreamUnavailable
from llmrouter.generation import from_completions
from llmrouter.providers.base import ALL_PARAMETERS, Call, Capabilities, Completion, StreamPart
from llmrouter.routing.executor import Executor
from llmrouter.routing.health import LocalHealth
from llmrouter.routing.plan import Catalog
from llmrouter.settings import (
    DeploymentSettings,
    HealthSettings,
    ModelSettings,
    OpenAIProvider,
    RoutingSettings,
    Settings,
    Timeouts,
)
from llmrouter.wire.completions import ChunkChoice, CompletionChoice, Usage
from llmrouter.wire.validate import decode_completion_request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A provider whose every call runs `answer` (a coroutine the test writes)."""

    name = "p"
    timeouts = Timeouts()

    def __init__(self, answer: Callable[[Call], Awaitable[Completion]]) -> None:
        self.answer = answer
        self.calls = 0

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        return Capabilities(parameters=ALL_PARAMETERS)

    def usable(self, deployment: DeploymentSettings) -> bool:
        return True

    def ready(self, deployment: DeploymentSettings) -> bool:
        return True

    async def complete(self, call: Call) -> Completion:
        self.calls += 1
        return await self.answer(call)

    async def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:  # not used here
        raise AssertionError("not streamed")
        yield


def ok() -> Completion:
    return Completion([CompletionChoice("hi", 0, None, "stop")], Usage(1, 1, 2))


def setup(
    answer: Callable[[Call], Awaitable[Completion]], clock: Clock
) -> tuple[Executor, Catalog, LocalHealth, Scripted]:
    settings = Settings(
        providers={"p": OpenAIProvider(base_url="http://127.0.0.1:9/v1")},
        models=[ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="x")])],
        routing=RoutingSettings(
            health=HealthSettings(consecutive_failures=1, cooldown_seconds=5, max_cooldown_seconds=60)
        ),
    )
    provider = Scripted(answer)
    health = LocalHealth(settings.routing.health, clock=clock)
    catalog = Catalog(settings, {"p": provider}, health)  # type: ignore[dict-item]
    return Executor(settings.routing, health), catalog, health, provider


def test_a_panic_attempt_beside_the_probe_does_not_spoil_the_probe() -> None:
    """The only deployment is half-open, its probe in flight; a second request finds nothing in
    rotation and tries it anyway (panic) and fails. That failure must not eject it again, nor
    take the probe's place: the probe's success brings it back."""
    clock = Clock()
    probe_may_answer = asyncio.Event()

    async def answer(call: Call) -> Completion:
        if provider.calls == 1:  # the probe: answers well, once the panic attempt has failed
            await probe_may_answer.wait()
            return ok()
        raise UpstreamUnavailable("the panic attempt fails")

    executor, catalog, health, provider = setup(answer, clock)
    route, request = from_completions(*decode_completion_request(b'{"model": "m", "prompt": "Hi"}'))
    health.record("p/x", False)  # ejected for 5 s
    clock.now += 5  # the cooldown is over: the next attempt is the probe

    async def run() -> None:
        probe = asyncio.ensure_future(
            executor.complete(catalog.plan(route, request, None), request, "a")
        )
        await asyncio.sleep(0)
        assert not health.available("p/x")  # the probe is out
        with pytest.raises(UpstreamUnavailable) as failed:
            await executor.complete(catalog.plan(route, request, None), request, "b")
        assert [(a.target, a.note) for a in failed.value.attempts] == [("p/x", "panic")]
        assert health.ejection("p/x")[1] == 0  # not ejected again by it
        probe_may_answer.set()
        _, result, attempts = await probe
        assert result.choices[0].text == "hi" and str(attempts[0]).startswith("p/x ok")

    asyncio.run(run())
    assert health.available("p/x")  # the probe's success brought it back
    assert provider.calls == 2


def test_after_its_panic_attempt_a_request_s_next_attempt_there_is_a_probe() -> None:
    """Panic is one attempt, not a mark on the deployment for the rest of the request: once the
    cooldown ends (during the backoff before the next pass), the request's next attempt there is
    the probe, and its failure ejects the deployment again, for twice as long."""
    clock = Clock()

    async def answer(call: Call) -> Completion:
        clock.now += 1  # each attempt takes a second of the health clock
        raise UpstreamUnavailable("dead")

    executor, catalog, health, provider = setup(answer, clock)
    route, request = from_completions(*decode_completion_request(b'{"model": "m", "prompt": "Hi"}'))
    health.record("p/x", False)  # ejected for 5 s
    clock.now += 4.5  # half a second of the cooldown left: the first attempt is a panic one

    async def run() -> list[str]:
        with pytest.raises(UpstreamUnavailable) as failed:
            await executor.complete(catalog.plan(route, request, None), request, "a")
        return [a.note for a in failed.value.attempts]

    assert asyncio.run(run()) == ["panic", ""]  # the panic attempt, then the probe
    assert health.ejection("p/x") == (2, pytest.approx(10))  # the probe's failure counted
    assert provider.calls == 2


def test_a_cut_stream_with_only_a_chat_api_left_ends_at_once() -> None:
    """The continuation of a cut stream never goes to a chat API; when nothing else is left it
    ends then, not after spinning through passes until the deadline (a review found 19.6 s)."""
    import json

    from llmrouter.providers import _http
    from llmrouter.providers.openai import OpenAIAdapter
    from llmrouter.providers.openai_chat import OpenAIChatAdapter
    from llmrouter.settings import CheckSettings, OpenAIChatProvider

    calls = {"a": 0, "b": 0}
    chunk = {"choices": [{"text": "Hel", "index": 0, "logprobs": None, "finish_reason": None}]}

    async def cut(request: _http.Request) -> _http.MockResponse:
        calls["a"] += 1
        return _http.MockResponse(
            200, [b"data: " + json.dumps(chunk).encode() + b"\n\n", ConnectionResetError()]
        )

    async def chat(request: _http.Request) -> _http.MockResponse:
        calls["b"] += 1
        raise AssertionError("a chat API is never sent the text so far")

    pa, pb = OpenAIProvider(base_url="http://a/v1"), OpenAIChatProvider(api_key="k")
    settings = Settings(
        providers={"a": pa, "b": pb},
        models=[
            ModelSettings(
                id="m",
                resume_streams=True,
                strategy="ordered",
                deployments=[
                    DeploymentSettings(provider="a", model="x"),
                    DeploymentSettings(provider="b", model="y"),
                ],
            )
        ],
        routing=RoutingSettings(
            deadline_seconds=20,
            health=HealthSettings(consecutive_failures=1, cooldown_seconds=60, max_cooldown_seconds=600),
        ),
    )

    async def run() -> tuple[list[str], float]:
        a = OpenAIAdapter("a", pa, [], CheckSettings(), _http.MockTransport(cut, name="a"))
        b = OpenAIChatAdapter("b", pb, [], CheckSettings(), _http.MockTransport(chat, name="b"))
        await a.start()
        await b.start()
        health = LocalHealth(settings.routing.health)
        catalog = Catalog(settings, {"a": a, "b": b}, health)
        executor = Executor(settings.routing, health)
        body = b'{"prompt": "Say hello", "stream": true, "max_tokens": 10}'
        route, request = from_completions(*decode_completion_request(body))
        opened = await executor.open_stream(
            catalog.plan(route, request, None), request, "r", resume=True
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamUnavailable):
            async for _ in opened.rest:
                pass
        return [str(x) for x in opened.attempts], loop.time() - started

    attempts, took = asyncio.run(run())
    assert calls["b"] == 0 and took < 5  # (20 s of passes, before; 0.02 s here)
    assert all(a.startswith("a/x") for a in attempts), attempts


# -- a committed stream's deadline (one timer for the whole stream) ------------------------------


class _Health:
    def __init__(self) -> None:
        self.finished_labels: list[str] = []

    def finished(self, label: str) -> None:
        self.finished_labels.append(label)

    def observe_throughput(self, label: str, tokens_per_second: float) -> None: ...

    def record(self, label: str, ok: bool) -> None: ...


def _committed(parts: AsyncIterator[list[StreamPart]], seconds: float) -> tuple[object, _Health]:
    from types import SimpleNamespace

    from llmrouter.routing.streams import CommittedStream
    from llmrouter.wire.completions import ChunkChoice

    first = [StreamPart([ChunkChoice("a", 0)])]
    health = _Health()
    deadline = asyncio.get_running_loop().time() + seconds
    target = SimpleNamespace(label="p/x")
    return CommittedStream(health, target, first, parts, deadline), health  # type: ignore[arg-type]


def test_the_deadline_cuts_a_stream_waiting_for_its_next_part() -> None:
    from llmrouter.errors import DeadlineExceeded
    from llmrouter.wire.completions import ChunkChoice

    async def hangs() -> AsyncIterator[list[StreamPart]]:
        yield [StreamPart([ChunkChoice("b", 0)])]
        await asyncio.sleep(30)
        yield [StreamPart([ChunkChoice("never", 0)])]

    async def main() -> None:
        stream, health = _committed(hangs(), 0.2)
        got = await anext(stream)  # type: ignore[call-overload]
        started = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceeded):
            got += await anext(stream)  # type: ignore[call-overload]
        assert 0.1 < asyncio.get_running_loop().time() - started < 1.0
        assert [p.choices[0].text for p in got] == ["b"] and health.finished_labels == ["p/x"]
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_deadline_passed_while_writing_is_raised_at_the_next_part() -> None:
    from llmrouter.errors import DeadlineExceeded
    from llmrouter.wire.completions import ChunkChoice

    async def quick() -> AsyncIterator[list[StreamPart]]:
        for text in ("b", "c"):
            yield [StreamPart([ChunkChoice(text, 0)])]

    async def main() -> None:
        stream, _ = _committed(quick(), 0.1)
        await anext(stream)  # type: ignore[call-overload]
        await asyncio.sleep(0.3)  # "writing it out" past the deadline: not cancelled meanwhile
        with pytest.raises(DeadlineExceeded):
            await anext(stream)  # type: ignore[call-overload]

    asyncio.run(main())


async def _hanging() -> AsyncIterator[list[StreamPart]]:
    """An upstream's stream that sends nothing (for longer than any test waits)."""
    await asyncio.sleep(30)
    yield [StreamPart([])]


def test_a_cancellation_of_the_consumer_is_not_taken_for_the_deadline() -> None:
    async def main() -> None:
        stream, _ = _committed(_hanging(), 10.0)
        task = asyncio.ensure_future(anext(stream))  # type: ignore[call-overload]
        await asyncio.sleep(0.05)
        task.cancel()  # the client left
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_client_that_leaves_as_the_deadline_passes_is_still_a_client_that_left() -> None:
    """The client's cancellation and the deadline in one turn of the loop (the client's first): the
    consumer sees its cancellation, never a deadline error it would answer (found by a review)."""

    async def main() -> None:
        stream, _ = _committed(_hanging(), 10.0)
        task = asyncio.ensure_future(anext(stream))  # type: ignore[call-overload]
        await asyncio.sleep(0.05)
        task.cancel()  # the client left...
        stream._expire()  # type: ignore[attr-defined]  # ...and the deadline fired, in this turn
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_streams_throughput_is_timed_over_its_whole_attempt_as_an_answers_is() -> None:
    """A short answer whose events all come in one read, and a whole answer served as a stream
    (a deployment that cannot stream): tokens over the attempt's time, never over the
    microseconds between the commit and the batch that carries the count (found by a review)."""
    from llmrouter.wire.completions import ChunkChoice

    class OneRead(Scripted):
        def __init__(self, streams: bool) -> None:
            super().__init__(self.whole)
            self.streams = streams

        async def whole(self, call: Call) -> Completion:
            await asyncio.sleep(0.3)
            return Completion([CompletionChoice("twenty tokens", 0, None, "stop")], Usage(5, 20, 25))

        def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
            return Capabilities(parameters=ALL_PARAMETERS - (set() if self.streams else {"stream"}))

        async def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
            await asyncio.sleep(0.3)  # then text, its end and the count in one read
            yield [
                StreamPart([ChunkChoice("twenty tokens", 0)]),
                StreamPart([ChunkChoice("", 0, None, "stop")]),
                StreamPart([], usage=Usage(5, 20, 25)),
            ]

    def sample(streams: bool) -> float | None:
        settings = Settings(
            providers={"p": OpenAIProvider(base_url="http://127.0.0.1:9/v1")},
            models=[ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="x")])],
        )
        health = LocalHealth(settings.routing.health)
        catalog = Catalog(settings, {"p": OneRead(streams)}, health)  # type: ignore[dict-item]
        executor = Executor(settings.routing, health)
        body = b'{"model": "m", "prompt": "Hi", "stream": true}'
        route, request = from_completions(*decode_completion_request(body))

        async def run() -> None:
            opened = await executor.open_stream(catalog.plan(route, request, None), request, "r")
            async for _ in opened.rest:
                pass

        asyncio.run(run())
        return health.throughput("p/x")

    for streams in (True, False):
        rate = sample(streams)
        assert rate is not None and 20 < rate < 70, (streams, rate)  # 20 tokens in 0.3 s


class Streams(Scripted):
    """A provider of two deployments' streams: `x` produces after 30 ms, `y` never, and takes a
    moment to unwind when cancelled. Which streams were closed, by deployment."""

    def __init__(self) -> None:
        super().__init__(lambda call: asyncio.sleep(0, ok()))
        self.closed: dict[str, bool] = {}

    async def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        model = call.deployment.model
        self.closed[model] = False
        try:
            if model == "x":
                await asyncio.sleep(0.03)
                yield [StreamPart([ChunkChoice("hi", 0)])]
                await asyncio.sleep(10)
            else:
                await asyncio.sleep(10)
                yield []
        finally:
            self.closed[model] = True
            if model == "y":
                await asyncio.sleep(0.05)  # the loser takes a moment to unwind


@pytest.mark.parametrize("cancel_at", [0.045, 0.0455, 0.05])
def test_a_request_cancelled_while_a_losing_hedge_unwinds_releases_the_winner(cancel_at: float) -> None:
    """The hedge `x` has won and the loser `y` is unwinding when the client leaves: the winner's
    stream is closed and neither deployment is left counted in flight (the winner was dropped
    with both, for ever)."""
    settings = Settings(
        providers={"p": OpenAIProvider(base_url="http://127.0.0.1:9/v1")},
        models=[
            ModelSettings(
                id="m",
                strategy="ordered",
                hedge_after_ms=10,
                deployments=[
                    DeploymentSettings(provider="p", model="x"),
                    DeploymentSettings(provider="p", model="y"),
                ],
            )
        ],
    )
    provider = Streams()

    async def main() -> tuple[str, dict[str, bool], dict[str, int]]:
        health = LocalHealth(settings.routing.health)
        catalog = Catalog(settings, {"p": provider}, health)  # type: ignore[dict-item]
        executor = Executor(settings.routing, health)
        body = b'{"model": "m", "prompt": "x", "stream": true, "max_tokens": 5}'
        route, request = from_completions(*decode_completion_request(body))
        plan = catalog.plan(route, request, None)
        task = asyncio.ensure_future(executor.open_stream(plan, request, "r"))
        await asyncio.sleep(cancel_at)  # x has won; y is unwinding
        task.cancel()  # the client left
        try:
            opened = await task
            await opened.aclose()
            outcome = "opened"
        except asyncio.CancelledError:
            outcome = "cancelled"
        await asyncio.sleep(0.1)
        return outcome, dict(provider.closed), {t.label: health.in_flight(t.label) for t in plan.targets}

    outcome, closed, in_flight = asyncio.run(main())
    assert outcome == "cancelled"
    assert closed == {"x": True, "y": True}
    assert in_flight == {"p/x": 0, "p/y": 0}
