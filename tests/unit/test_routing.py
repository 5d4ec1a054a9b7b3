"""Strategies, deployment health and the retry budget, on a fake clock and seeded randomness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from llmrouter.providers.base import Capabilities
from llmrouter.routing.budget import RetryBudget
from llmrouter.routing.health import LocalHealth
from llmrouter.routing.plan import Target
from llmrouter.routing.strategies import order_targets
from llmrouter.settings import (
    AffinitySettings,
    DeploymentSettings,
    HealthSettings,
    ModelSettings,
    Pricing,
)
from llmrouter.wire.validate import Prompts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def targets(*deployments: DeploymentSettings) -> list[Target]:
    model = ModelSettings(id="m", deployments=list(deployments), pricing=Pricing(1, 1))
    caps = Capabilities(parameters=frozenset())
    return [Target(model, d, None, caps) for d in deployments]  # type: ignore[arg-type]


def d(name: str, **kw: object) -> DeploymentSettings:
    return DeploymentSettings(provider=name, model="x", **kw)  # type: ignore[arg-type]


def firsts(strategy: str, ts: list[Target], health: LocalHealth, n: int = 4000) -> Counter[str]:
    rng = random.Random(1234)
    return Counter(order_targets(strategy, ts, health, rng)[0].label for _ in range(n))


def health(clock: Clock | None = None, **kw: object) -> LocalHealth:
    return LocalHealth(HealthSettings(**kw), clock=clock or Clock())  # type: ignore[arg-type]


def test_weighted_picks_first_in_proportion_to_weight() -> None:
    ts = targets(d("a", weight=1), d("b", weight=3))
    counts = firsts("weighted", ts, health())
    assert counts["b/x"] / 4000 == pytest.approx(0.75, abs=0.03)
    orders = {
        tuple(t.label for t in order_targets("weighted", ts, health(), random.Random(i)))
        for i in range(50)
    }
    assert orders == {("a/x", "b/x"), ("b/x", "a/x")}  # every deployment stays as a fallback


def test_ordered_follows_priority_then_the_file() -> None:
    ts = targets(d("a", priority=2), d("b", priority=1), d("c", priority=2))
    labels = [t.label for t in order_targets("ordered", ts, health(), random.Random(0))]
    assert labels == ["b/x", "a/x", "c/x"]


def test_lowest_cost_uses_deployment_prices_over_the_model_s() -> None:
    ts = targets(d("a"), d("b", pricing=Pricing(0.1, 0.2)), d("c", pricing=Pricing(5, 5)))
    labels = [t.label for t in order_targets("lowest_cost", ts, health(), random.Random(0))]
    assert labels == ["b/x", "a/x", "c/x"]  # a has the model's 1 + 1


def test_lowest_latency_follows_the_ewma_and_measures_the_unknown_first() -> None:
    h = health()
    ts = targets(d("a"), d("b"), d("c"))
    for seconds in (0.5, 0.5, 0.5):
        h.observe_latency("a/x", seconds)
    h.observe_latency("b/x", 0.1)
    assert [t.label for t in order_targets("lowest_latency", ts, h, random.Random(0))] == [
        "c/x",
        "b/x",
        "a/x",
    ]
    for _ in range(20):  # b slows down: the EWMA follows
        h.observe_latency("b/x", 2.0)
    h.observe_latency("c/x", 1.0)
    assert order_targets("latency", ts, h, random.Random(0))[0].label == "a/x"


def test_least_busy_prefers_fewest_in_flight_and_spreads_ties() -> None:
    h = health()
    ts = targets(d("a"), d("b"), d("c"))
    h.started("a/x")
    h.started("a/x")
    h.started("b/x")
    assert [t.label for t in order_targets("least_busy", ts, h, random.Random(0))] == [
        "c/x",
        "b/x",
        "a/x",
    ]
    h.started("c/x")  # b and c tie at one
    counts = firsts("least_busy", ts, h)
    assert set(counts) == {"b/x", "c/x"}
    assert counts["b/x"] / 4000 == pytest.approx(0.5, abs=0.04)


def test_ejection_after_consecutive_failures_then_one_probe() -> None:
    clock = Clock()
    h = health(clock, consecutive_failures=3, cooldown_seconds=5, max_cooldown_seconds=12)
    for _ in range(2):
        h.record("a", False)
    assert h.available("a")
    h.record("a", False)
    assert not h.available("a")
    assert h.unavailable_for("a") == pytest.approx(5)
    clock.now += 5
    assert h.available("a")
    h.claim("a")  # the probe
    assert not h.available("a")  # only one at a time
    h.record("a", False)  # the probe failed: out again, for twice as long
    assert h.unavailable_for("a") == pytest.approx(10)
    clock.now += 10
    assert h.available("a")
    h.claim("a")
    h.record("a", False)
    assert h.unavailable_for("a") == pytest.approx(12)  # capped
    clock.now += 12
    h.claim("a")
    h.record("a", True)  # the probe came back well: full traffic
    for _ in range(5):
        assert h.available("a")
        h.claim("a")


def test_a_probe_that_never_reports_back_does_not_keep_the_deployment_out() -> None:
    clock = Clock()
    h = health(clock, consecutive_failures=1, cooldown_seconds=1)
    h.record("a", False)
    clock.now += 1
    assert h.available("a")  # looking does not claim
    assert h.available("a")
    h.claim("a")  # the probe starts, and is cancelled: no outcome is ever recorded
    assert not h.available("a")
    clock.now += 61
    assert h.available("a")


def test_ejection_on_failure_rate() -> None:
    h = health(consecutive_failures=100, failure_rate=0.5, window=10, min_attempts=10)
    for i in range(9):
        h.record("a", i % 2 == 0)  # 5 ok, 4 failed: not yet 10 attempts
    assert h.available("a")
    h.record("a", False)  # 10 attempts, 5 failed
    assert not h.available("a")


def test_retry_after_skips_without_ejecting() -> None:
    clock = Clock()
    h = health(clock)
    h.skip_for("a", 7)
    assert not h.available("a") and h.retry_after_for("a") == pytest.approx(7)
    clock.now += 7
    assert h.available("a") and h.available("a")


def test_retry_budget_is_a_share_of_requests_plus_a_reserve_per_second() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 10, ttl_seconds=10, clock=clock)
    assert budget.reserve == 100
    for _ in range(200):
        budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(1000)) == 100 + 40  # exactly
    clock.now += 10.01  # all of it has expired (one 10 ms bucket late): the reserve is back
    assert sum(budget.try_withdraw() for _ in range(1000)) == 100


def test_the_retry_budget_never_refuses_below_its_reserve_rate() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 10, ttl_seconds=10, clock=clock)
    # A quiet router whose every request needs a fallback: ten a second, for a minute.
    for _ in range(600):
        budget.deposit()
        assert budget.try_withdraw()
        clock.now += 0.1


def test_the_retry_budget_caps_a_sustained_storm_at_its_ratio() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 10, ttl_seconds=10, clock=clock)
    granted = 0
    for _ in range(60_000):  # 1,000 requests a second for a minute, each wanting three retries
        budget.deposit()
        granted += sum(budget.try_withdraw() for _ in range(3))
        clock.now += 0.001
    # Over any 10 s: 20% of its requests and the reserve of 100. Six windows in the minute.
    assert 0.2 * 60_000 + 5 * 100 < granted <= 0.2 * 60_000 + 6 * 100


def test_the_reserve_is_not_given_twice_in_one_ttl() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 10, ttl_seconds=10, clock=clock)
    clock.now += 9.99
    assert sum(budget.try_withdraw() for _ in range(200)) == 100
    clock.now += 9.01  # 9 s later: those 100 are still within the last 10 s
    assert not budget.try_withdraw()
    clock.now += 1.0  # now they are not (10 ms buckets: at most one late)
    assert sum(budget.try_withdraw() for _ in range(200)) == 100


def test_the_retry_budget_keeps_its_promise() -> None:
    """A retry is allowed only if, with it, the retries of the last 10 s stay within 100 plus 20%
    of the requests of the last 10 s (checked at every retry of a random, bursty load); so over
    any 10 s, retries are at most 100 plus 20% of the requests of those 10 s and the 10 before."""
    rng = random.Random(11)
    clock = Clock()
    budget = RetryBudget(0.2, 10, ttl_seconds=10, clock=clock)
    requests: list[float] = []
    retries: list[float] = []
    for _ in range(20_000):
        clock.now += rng.choice([0.0, 0.0, 0.001, 0.01, 0.3, 0.99, 2.5, 12.0])
        if rng.random() < 0.6:
            budget.deposit()
            requests.append(clock.now)
        elif budget.try_withdraw():
            retries.append(clock.now)
            since = clock.now - 10
            recent_requests = sum(1 for t in requests[-5000:] if t > since)
            recent_retries = sum(1 for t in retries[-5000:] if t > since)
            assert recent_retries <= 100 + 0.2 * recent_requests
    assert len(retries) > 1000  # the budget was exercised, not just refused
    for _ in range(2000):
        start = rng.uniform(retries[0] - 10, retries[-1])
        inside = sum(1 for t in retries if start < t <= start + 10)
        funded = sum(1 for t in requests if start - 10 < t <= start + 10)
        assert inside <= 100 + 0.2 * funded


def test_a_retry_budget_with_no_ratio_and_no_reserve_refuses_every_retry() -> None:
    budget = RetryBudget(0, 0, clock=Clock())
    budget.deposit()
    assert not budget.try_withdraw()


def test_failures_already_in_flight_do_not_eject_again() -> None:
    clock = Clock()
    h = health(clock, consecutive_failures=2, cooldown_seconds=5)
    for _ in range(30):  # one burst of failures from requests that were all in flight
        h.record("a", False)
    assert h.unavailable_for("a") == pytest.approx(5)  # one ejection, not fifteen


def test_release_lets_the_next_request_probe() -> None:
    clock = Clock()
    h = health(clock, consecutive_failures=1, cooldown_seconds=1)
    h.record("a", False)
    clock.now += 1
    h.claim("a")
    assert not h.available("a")
    h.release("a")  # the probe was rate-limited: nothing learnt
    assert h.available("a")


# -- prefix affinity ----------------------------------------------------------------------------


def affine(*deployments: DeploymentSettings, **affinity: object) -> list[Target]:
    model = ModelSettings(
        id="m",
        deployments=list(deployments),
        strategy="prefix_affinity",
        affinity=AffinitySettings(**affinity),  # type: ignore[arg-type]
    )
    caps = Capabilities(parameters=frozenset())
    return [Target(model, d, None, caps) for d in deployments]  # type: ignore[arg-type]


def first_for(prompt: str | tuple[int, ...], ts: list[Target], h: LocalHealth | None = None) -> str:
    rng = random.Random()  # the order must not depend on it
    prompts: Prompts = (prompt,)  # type: ignore[assignment]
    return order_targets("prefix_affinity", ts, h or health(), rng, prompts)[0].label


def test_the_same_prefix_always_goes_to_the_same_deployment() -> None:
    ts = affine(d("a"), d("b"), d("c"), d("d"), prefix_bytes=16)
    prefix = "You are a helpful assistant. "
    firsts = {first_for(prefix + f"Question {i}?", ts) for i in range(1000)}
    assert len(firsts) == 1  # only the first 16 bytes count
    # Other prefixes go elsewhere, about evenly.
    spread = Counter(first_for(f"{i:04d} and the same rest", ts) for i in range(4000))
    assert set(spread) == {"a/x", "b/x", "c/x", "d/x"}
    assert all(n / 4000 == pytest.approx(0.25, abs=0.03) for n in spread.values())


def test_prefix_affinity_follows_the_weights() -> None:
    ts = affine(d("a", weight=1), d("b", weight=3))
    spread = Counter(first_for(f"prompt {i}", ts) for i in range(4000))
    assert spread["b/x"] / 4000 == pytest.approx(0.75, abs=0.03)


def test_removing_a_deployment_moves_only_the_prefixes_it_held() -> None:
    four = affine(d("a"), d("b"), d("c"), d("d"))
    three = affine(d("a"), d("b"), d("d"))
    prompts = [f"tenant {i}: the system prompt" for i in range(2000)]
    before = {p: first_for(p, four) for p in prompts}
    after = {p: first_for(p, three) for p in prompts}
    moved = {p for p in prompts if before[p] != after[p]}
    assert moved == {p for p in prompts if before[p] == "c/x"}
    assert Counter(after[p] for p in moved).keys() == {"a/x", "b/x", "d/x"}  # spread, not piled


def test_token_id_prompts_hash_their_first_tokens() -> None:
    ts = affine(d("a"), d("b"), d("c"), prefix_tokens=4)
    assert len({first_for((1, 2, 3, 4, i), ts) for i in range(200)}) == 1
    assert len({first_for((i, 2, 3, 4), ts) for i in range(200)}) == 3


def test_an_ejected_first_choice_leaves_its_prefix_to_the_second() -> None:
    clock = Clock()
    h = health(clock, consecutive_failures=1)
    ts = affine(d("a"), d("b"), d("c"))
    order = order_targets("prefix_affinity", ts, h, random.Random(), ("same prefix",))
    h.record(order[0].label, False)  # ejected: the executor skips it, to the same second choice
    again = order_targets("prefix_affinity", ts, h, random.Random(), ("same prefix",))
    assert [t.label for t in again] == [t.label for t in order]


def test_a_hot_prefix_spills_to_the_least_busy_deployment() -> None:
    h = health()
    ts = affine(d("a"), d("b"), d("c"), spill_after=4, max_share=0.5)
    home = first_for("hot", ts, h)
    others = [t.label for t in ts if t.label != home]
    for _ in range(3):
        h.started(home)
    assert first_for("hot", ts, h) == home  # three in flight: below spill_after
    h.started(home)
    assert first_for("hot", ts, h) != home  # four, and all of the model's: spill
    h.started(others[0])
    h.started(others[1])
    h.started(others[1])
    assert first_for("hot", ts, h) == others[0]  # the least busy
    h.started(others[0])
    h.started(others[0])  # home 4 of 9 in flight: not more than half
    assert first_for("hot", ts, h) == home
