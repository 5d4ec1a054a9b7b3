"""The embedded engine decodes concurrent choices together (issue 16), and a choice's text, logprobs
included, is what it is alone: whatever else runs, joins or leaves beside it. On the real model."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llmrouter.errors import ServiceUnavailable
from llmrouter.providers._llama_engine import (
    ChoiceDelta,
    ChoiceEnd,
    Engine,
    Job,
    JobUsage,
    Sampling,
    TokenInfo,
)
from llmrouter.structured import guidance_for
from llmrouter.wire.completions import JSONSchemaConfig, ResponseFormatJSONSchema

PERSON = {"type": "object", "properties": {"age": {"type": "integer"}}}
SCHEMA = ResponseFormatJSONSchema(JSONSchemaConfig("person", schema=PERSON))
NO_END = {0: -100.0, 2: -100.0, 4: -100.0}  # SmolLM2's end tokens: every choice runs to max_tokens


@dataclass
class Run:
    """One job's events as they come, kept for comparing."""

    job: Job
    events: queue.Queue[tuple[float, object]]  # each with when it was sent
    texts: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, list[TokenInfo]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: JobUsage | None = None
    error: object = None
    deltas: int = 0
    first_text_at: float = 0.0
    ended_at: float = 0.0  # when its last event came
    choice_ends: list[float] = field(default_factory=list)
    over: bool = False

    def take(self) -> bool:
        """One event; False once the job is over."""
        if self.over:
            return False
        now, event = self.events.get(timeout=60)
        if event is None:
            self.over, self.ended_at = True, now
        elif isinstance(event, ChoiceDelta):
            self.deltas += 1
            self.first_text_at = self.first_text_at or now
            self.texts[event.index] = self.texts.get(event.index, "") + event.text
            self.tokens.setdefault(event.index, []).extend(event.tokens or [])
        elif isinstance(event, ChoiceEnd):
            self.finish[event.index] = event.finish_reason
            self.choice_ends.append(now)
        elif isinstance(event, JobUsage):
            self.usage = event
        else:
            self.error = event
        return not self.over

    def wait_deltas(self, count: int) -> None:
        while self.deltas < count:
            assert self.take(), "the job ended early"

    def result(self) -> tuple[Any, ...]:
        while self.take():
            pass
        assert self.error is None, self.error
        return self.texts, self.tokens, self.finish, self.usage


def submit(engine: Engine, prompt: str, n: int = 1, **sampling: Any) -> Run:
    s = Sampling(**sampling)
    events: queue.Queue[tuple[float, object]] = queue.Queue()
    prepared = engine.prepare((prompt,), s, special=True)
    job = Job(prepared, n, s, lambda event: events.put((time.monotonic(), event)))
    engine.submit(job)
    return Run(job, events)


def alone(engine: Engine, prompt: str, n: int = 1, **sampling: Any) -> tuple[Any, ...]:
    return submit(engine, prompt, n, **sampling).result()


def start(gguf: Path, **settings: Any) -> Iterator[Engine]:
    engine = Engine("batching", gguf, n_threads=None, **{"max_queue": 16, **settings})
    engine.start()
    engine.loaded.wait()
    assert engine.load_error is None
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def engine(gguf: Path) -> Iterator[Engine]:
    yield from start(gguf, n_ctx=2048, max_sequences=8)


# Seven requests unlike each other and the one under test: other prompts, lengths, samplers,
# a grammar, a schema, echo with prompt logprobs, stops; they end at different steps.
OTHERS: list[tuple[str, dict[str, Any]]] = [
    ("Once upon a time, in a land far away,", {"max_tokens": 20, "seed": 1}),
    ("def fibonacci(n):", {"max_tokens": 12, "temperature": 0.0, "logprobs": 3}),
    ("Is the sea salty? Answer:", {"max_tokens": 5, "seed": 6, "grammar": 'root ::= " yes" | " no"'}),
    (
        "A person as JSON:",
        {"max_tokens": 16, "seed": 4, "guidance": guidance_for(SCHEMA)},
    ),
    ("The sky is", {"max_tokens": 9, "echo": True, "logprobs": 1, "temperature": 0.7, "seed": 2}),
    ("List three colours:", {"max_tokens": 24, "stop": ["\n\n"], "top_p": 0.9, "seed": 3}),
    ("Water boils at", {"max_tokens": 14, "frequency_penalty": 0.5, "seed": 5}),
]

TARGETS = [
    pytest.param({"temperature": 0.0}, id="greedy"),
    pytest.param({"temperature": 1.0, "seed": 11}, id="sampled"),
]


@pytest.mark.parametrize("sampling", TARGETS)
def test_a_choice_is_the_same_alone_and_among_seven_others(engine: Engine, sampling: Any) -> None:
    prompt = "The capital of France is"
    body: dict[str, Any] = {"max_tokens": 20, "logprobs": 2, **sampling}
    expected = alone(engine, prompt, **body)
    runs = [submit(engine, p, **b) for p, b in OTHERS[:3]]
    target = submit(engine, prompt, **body)
    runs += [submit(engine, p, **b) for p, b in OTHERS[3:]]
    assert target.result() == expected
    others = [run.result() for run in runs]
    assert others == [alone(engine, p, **b) for p, b in OTHERS]  # and so is each of them


def test_a_request_that_joins_midway_is_the_same_as_alone(engine: Engine) -> None:
    body: dict[str, Any] = {"max_tokens": 20, "logprobs": 1, "temperature": 0.9, "seed": 21}
    expected = alone(engine, "Hello, my name is", **body)
    plain = [OTHERS[i] for i in (0, 1, 4, 6)]  # no grammar, no stop: each runs to max_tokens
    runs = [submit(engine, p, **{**b, "max_tokens": 32, "logit_bias": NO_END}) for p, b in plain]
    for run in runs:
        run.wait_deltas(5)  # they are all decoding now
    late = submit(engine, "Hello, my name is", **body)
    assert late.result() == expected
    for run in runs:
        run.result()
        assert late.ended_at < run.ended_at  # it ran beside them, not after


def test_cancelling_one_choice_leaves_the_others_text_alone(engine: Engine) -> None:
    bodies = [(p, {**b, "max_tokens": 20, "logit_bias": NO_END}) for p, b in OTHERS[:2] + OTHERS[4:]]
    expected = [alone(engine, p, **b) for p, b in bodies]
    runs = [submit(engine, p, **b) for p, b in bodies]
    doomed = submit(engine, "Count: 1, 2, 3,", max_tokens=200, logit_bias=NO_END, logprobs=0)
    doomed.wait_deltas(4)
    doomed.job.cancelled.set()
    while doomed.take():
        pass
    assert doomed.usage is None and not doomed.finish  # stopped between two tokens, no end
    assert 4 <= len(doomed.tokens[0]) < 20
    assert [run.result() for run in runs] == expected


@pytest.fixture(scope="module")
def single(gguf: Path) -> Iterator[Engine]:
    """One choice at a time, in one context: the engine before batching."""
    yield from start(gguf, n_ctx=2048, max_sequences=1)


def test_batched_choices_are_those_decoded_one_at_a_time(engine: Engine, single: Engine) -> None:
    many: dict[str, Any] = {"n": 6, "max_tokens": 16, "seed": 31, "logprobs": 1, "logit_bias": NO_END}
    batched = alone(engine, "Three words:", **many)
    texts, usage = batched[0], batched[3]
    assert usage.completion_tokens == 6 * 16 and len(set(texts.values())) == 6
    assert alone(single, "Three words:", **many) == batched
    greedy: dict[str, Any] = {"max_tokens": 24, "logprobs": 2, "temperature": 0.0}
    assert alone(single, "The capital of France is", **greedy) == alone(
        engine, "The capital of France is", **greedy
    )


LONG = "one two three four five six seven eight nine ten " * 26  # over 256 tokens


@pytest.fixture(scope="module")
def narrow(gguf: Path) -> Iterator[Engine]:
    """Two batch slots of 256 tokens and the wide slot of 512."""
    yield from start(gguf, n_ctx=512, max_sequences=2, max_queue=2)


def test_a_job_of_many_choices_does_not_starve_a_later_one(narrow: Engine) -> None:
    big = submit(narrow, "Count:", n=8, max_tokens=30, logit_bias=NO_END, seed=1)
    big.wait_deltas(3)
    small = submit(narrow, "Hi", max_tokens=30, logit_bias=NO_END)
    small.result()
    big.result()
    # Three slots: the big job's first three choices ran first; the small one took a slot as soon
    # as one was free, before the big job's later choices.
    assert small.ended_at < sorted(big.choice_ends)[5]


def test_a_request_longer_than_a_batch_slot_waits_for_the_wide_one(narrow: Engine) -> None:
    assert narrow.prepare((LONG,), Sampling(max_tokens=0), special=True)[0].tokens[256:]
    expected = alone(narrow, LONG, max_tokens=20, temperature=0.0)
    first = submit(narrow, LONG, max_tokens=20, temperature=0.0)
    first.wait_deltas(1)  # started (the queue holds two)
    second = submit(narrow, LONG, max_tokens=20, temperature=0.0)
    short = submit(narrow, "Hi", max_tokens=5, temperature=0.0)
    assert first.result() == expected
    assert second.result() == expected
    assert second.first_text_at > first.ended_at  # it waited for the wide slot, in the queue
    assert short.result() == alone(narrow, "Hi", max_tokens=5, temperature=0.0)
    assert short.ended_at < first.ended_at  # ... and the short one did not wait behind it


def test_the_queue_bound_counts_the_requests_not_yet_started(narrow: Engine) -> None:
    runs = [submit(narrow, LONG, max_tokens=10, logit_bias=NO_END)]
    runs[0].wait_deltas(1)
    runs += [submit(narrow, LONG, max_tokens=10, logit_bias=NO_END) for _ in range(2)]
    with pytest.raises(ServiceUnavailable):  # one runs in the wide slot, two wait: the bound
        submit(narrow, LONG, max_tokens=10)
    for run in runs:
        run.result()
