"""Prefix affinity across router processes: the same prefix meets the same replica, on every
router replica; a removed deployment moves only its own prefixes; a hot prefix spills."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import httpx
import pytest

from tests.chaos.traffic import at_once, hits
from tests.conftest import Router, serving

PREFIX_BYTES = 32


def config(fake: str) -> str:
    return f"""default_model: affine
routing: {{seed: 7}}
providers:
  fast: {{kind: openai, base_url: {fake}/v1}}
  slow: {{kind: openai, base_url: {fake}/v1, headers: {{X-Fault: slow-ok-400}}}}
models:
  - id: affine
    strategy: prefix_affinity
    affinity: {{prefix_bytes: {PREFIX_BYTES}}}
    deployments:
      - {{provider: fast, model: aff-a}}
      - {{provider: fast, model: aff-b}}
      - {{provider: fast, model: aff-c}}
  - id: affine-without-b
    strategy: prefix_affinity
    affinity: {{prefix_bytes: {PREFIX_BYTES}}}
    deployments: [{{provider: fast, model: aff-a}}, {{provider: fast, model: aff-c}}]
  - id: hot
    strategy: prefix_affinity
    affinity: {{prefix_bytes: {PREFIX_BYTES}, spill_after: 4, max_share: 0.5}}
    deployments:
      - {{provider: slow, model: hot-a}}
      - {{provider: slow, model: hot-b}}
      - {{provider: slow, model: hot-c}}
"""


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[list[Router]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(serving(tmp_path_factory.mktemp(f"affinity{i}"), config(fake_upstream)))
            for i in range(2)
        ]


def where(client: httpx.Client, router: Router, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 1}
    r = client.post(f"{router.api}/completions", json=body, headers=router.headers())
    assert r.status_code == 200, r.text
    (attempt,) = r.headers["x-llmrouter-attempts"].split(", ")
    return attempt.split()[0]


def prefix(i: int) -> str:
    return f"System prompt of tenant {i:05d}. "[:PREFIX_BYTES].ljust(PREFIX_BYTES, ".")


def test_the_same_prefix_lands_on_the_same_deployment_on_every_replica(
    replicas: list[Router], fake: str
) -> None:
    rng = random.Random(3)
    with httpx.Client(timeout=30) as client:
        placed = {
            where(client, replicas[i % 2], "affine", prefix(1) + f"question {rng.random()}")
            for i in range(1000)
        }
    assert len(placed) == 1
    assert sum(hits(fake).values()) == 1000
    assert len(hits(fake)) == 1


def test_replicas_agree_on_every_prefix_and_removing_one_moves_only_its_own(
    replicas: list[Router], fake: str
) -> None:
    with httpx.Client(timeout=30) as client:
        first = {i: where(client, replicas[0], "affine", prefix(i) + "Hi") for i in range(90)}
        second = {i: where(client, replicas[1], "affine", prefix(i) + "Hello") for i in range(90)}
        fewer = {i: where(client, replicas[0], "affine-without-b", prefix(i) + "Hi") for i in range(90)}
    assert first == second
    assert set(first.values()) == {"fast/aff-a", "fast/aff-b", "fast/aff-c"}
    moved = {i for i in first if fewer[i] != first[i]}
    assert moved == {i for i in first if first[i] == "fast/aff-b"}


def test_a_hot_prefix_spills_instead_of_overloading_one_replica(
    replicas: list[Router], fake: str
) -> None:
    bodies = [
        {"model": "hot", "prompt": f"{prefix(7)} question {i}", "max_tokens": 1} for i in range(30)
    ]
    assert set(at_once(replicas[0], bodies)) == {200}
    spread = hits(fake)
    assert sum(spread.values()) == 30
    assert set(spread) == {"hot-a", "hot-b", "hot-c"}
    # Its home takes at most about half of what is in flight (the other two share the rest);
    # without the spill it would have taken all thirty.
    assert max(spread.values()) <= 16, spread


def test_without_load_a_prefix_stays_home(replicas: list[Router], fake: str) -> None:
    with httpx.Client(timeout=30) as client:
        homes = {where(client, replicas[0], "hot", f"{prefix(7)} q{i}") for i in range(20)}
    assert len(homes) == 1  # one request at a time never spills
