"""Fallback when it matters: a provider is down and the router must keep answering.

A dead deployment (every request a 500) in front of a healthy one, as the request's `model` with
the healthy one in `models`, and as two deployments of one model; requests one at a time and from
eight clients at once. The router must answer every one, and stop asking the dead one once it is
ejected, but for the probes its cooldowns allow. A Retry-After is honoured the same way across the
plan; and only when everything in a plan is out does the router try one anyway (panic mode).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.traffic import hits
from tests.conftest import Router, serving
from tests.spec import assert_error

CONSECUTIVE_FAILURES = 5
COOLDOWN, MAX_COOLDOWN = 0.5, 2.0


def config(fake: str, cooldown: float = COOLDOWN, max_cooldown: float = MAX_COOLDOWN) -> str:
    # The fault is chosen by a header of the provider, so that every deployment can have a model
    # name of its own: the fake counts hits by model name, and health is per deployment.
    def provider(name: str, fault: str | None) -> str:
        headers = f", headers: {{X-Fault: {fault}}}" if fault else ""
        return f"  {name}: {{kind: openai, base_url: {fake}/v1{headers}}}"

    providers = "\n".join(
        provider(name, fault)
        for name, fault in (
            ("dead", "status-500"),
            ("live", None),
            ("limited30", "retry-after-30"),
            ("limited2", "retry-after-2"),
            ("flip", "switch"),
            ("busy", "status-429-bare"),
        )
    )
    return f"""default_model: seq/good
routing:
  seed: 7
  health: {{consecutive_failures: {CONSECUTIVE_FAILURES}, cooldown_seconds: {cooldown},
            max_cooldown_seconds: {max_cooldown}}}
providers:
{providers}
models:
  - {{id: seq/bad, deployments: [{{provider: dead, model: seq-bad}}]}}
  - {{id: seq/good, deployments: [{{provider: live, model: seq-good}}]}}
  - {{id: conc/bad, deployments: [{{provider: dead, model: conc-bad}}]}}
  - {{id: conc/good, deployments: [{{provider: live, model: conc-good}}]}}
  - id: pair/seq
    strategy: ordered
    deployments: [{{provider: dead, model: pair-seq-bad}}, {{provider: live, model: pair-seq-good}}]
  - id: pair/conc
    strategy: ordered
    deployments: [{{provider: dead, model: pair-conc-bad}}, {{provider: live, model: pair-conc-good}}]
  - {{id: ra/primary, deployments: [{{provider: limited30, model: ra-primary}}]}}
  - {{id: ra/fallback, deployments: [{{provider: live, model: ra-fallback}}]}}
  - id: ra/pair
    strategy: ordered
    deployments: [{{provider: limited30, model: ra-pair-primary}}, {{provider: live, model: ra-pair-ok}}]
  - {{id: ra2/primary, deployments: [{{provider: limited2, model: ra2-primary}}]}}
  - {{id: ra2/fallback, deployments: [{{provider: live, model: ra2-fallback}}]}}
  - {{id: busy/primary, deployments: [{{provider: busy, model: busy-primary}}]}}
  - {{id: busy/fallback, deployments: [{{provider: live, model: busy-fallback}}]}}
  - id: busy/pair
    strategy: ordered
    deployments: [{{provider: busy, model: busy-pair-primary}}, {{provider: live, model: busy-pair-ok}}]
  - {{id: panic/a, deployments: [{{provider: flip, model: panic-a}}]}}
  - {{id: panic/b, deployments: [{{provider: flip, model: panic-b}}]}}
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    with serving(tmp_path_factory.mktemp("fallback"), config(fake_upstream)) as r:
        yield r


def probes_within(seconds: float, cooldown: float = COOLDOWN, cap: float = MAX_COOLDOWN) -> int:
    """How many half-open probes an ejected deployment can get in `seconds`: one each time a
    cooldown ends, the cooldowns doubling up to the cap."""
    probes, at = 0, 0.0
    while True:
        at += min(cooldown * 2**probes, cap)
        if at > seconds:
            return probes
        probes += 1


def sequential(router: Router, body: dict[str, object], count: int) -> tuple[Counter[int], float]:
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    with httpx.Client(headers=router.headers(), timeout=30) as client:
        for _ in range(count):
            statuses[client.post(f"{router.api}/completions", json=body).status_code] += 1
    return statuses, time.monotonic() - started


def concurrent(
    router: Router, body: dict[str, object], clients: int, each: int
) -> tuple[Counter[int], float]:
    async def run() -> list[int]:
        async with httpx.AsyncClient(headers=router.headers(), timeout=30) as client:

            async def one_client() -> list[int]:
                return [
                    (await client.post(f"{router.api}/completions", json=body)).status_code
                    for _ in range(each)
                ]

            return [
                s
                for batch in await asyncio.gather(*(one_client() for _ in range(clients)))
                for s in batch
            ]

    started = time.monotonic()
    statuses = Counter(asyncio.run(run()))
    return statuses, time.monotonic() - started


BODY = {"prompt": "Hi", "max_tokens": 4}


def test_a_quiet_router_serves_the_models_fallback_every_time(router: Router, fake: str) -> None:
    statuses, took = sequential(router, {**BODY, "model": "seq/bad", "models": ["seq/good"]}, 1000)
    assert statuses == {200: 1000}
    assert hits(fake)["seq-good"] == 1000
    # Ejected after five failures in a row; after that only the probes its cooldowns allow.
    assert hits(fake)["seq-bad"] <= CONSECUTIVE_FAILURES + probes_within(took), took


def test_eight_clients_get_the_models_fallback_every_time(router: Router, fake: str) -> None:
    statuses, took = concurrent(router, {**BODY, "model": "conc/bad", "models": ["conc/good"]}, 8, 200)
    assert statuses == {200: 1600}
    # Up to seven more requests may have been on their way to it when it was ejected.
    assert hits(fake)["conc-bad"] <= CONSECUTIVE_FAILURES + 7 + probes_within(took), took


def test_a_dead_deployment_of_the_same_model_never_starves_the_other(router: Router, fake: str) -> None:
    statuses, took = sequential(router, {**BODY, "model": "pair/seq"}, 1000)
    assert statuses == {200: 1000}
    assert hits(fake)["pair-seq-good"] == 1000
    assert hits(fake)["pair-seq-bad"] <= CONSECUTIVE_FAILURES + probes_within(took), took


def test_eight_clients_and_a_dead_deployment_of_the_same_model(router: Router, fake: str) -> None:
    statuses, took = concurrent(router, {**BODY, "model": "pair/conc"}, 8, 200)
    assert statuses == {200: 1600}
    assert hits(fake)["pair-conc-bad"] <= CONSECUTIVE_FAILURES + 7 + probes_within(took), took


@pytest.mark.parametrize(
    ("body", "primary", "fallback"),
    [
        ({"model": "ra/primary", "models": ["ra/fallback"]}, "ra-primary", "ra-fallback"),
        ({"model": "ra/pair"}, "ra-pair-primary", "ra-pair-ok"),
    ],
    ids=["models", "deployments"],
)
def test_retry_after_sends_requests_straight_to_the_fallback(
    router: Router, fake: str, body: dict[str, object], primary: str, fallback: str
) -> None:
    with httpx.Client(headers=router.headers(), timeout=30) as client:
        first = client.post(f"{router.api}/completions", json={**BODY, **body})
        assert first.status_code == 200
        assert first.headers["x-llmrouter-attempts"].startswith(f"limited30/{primary} upstream_rate")
        for _ in range(200):
            r = client.post(f"{router.api}/completions", json={**BODY, **body})
            assert r.status_code == 200
            assert r.headers["x-llmrouter-attempts"].startswith(f"live/{fallback} ok")
            assert "," not in r.headers["x-llmrouter-attempts"]  # nothing tried before it
    assert hits(fake)[primary] == 1  # Retry-After: 30, and the time is not up
    assert hits(fake)[fallback] == 201


@pytest.mark.parametrize(
    ("body", "primary"),
    [
        ({"model": "busy/primary", "models": ["busy/fallback"]}, "busy-primary"),
        ({"model": "busy/pair"}, "busy-pair-primary"),
    ],
    ids=["models", "deployments"],
)
def test_a_429_without_retry_after_is_skipped_for_a_second(
    router: Router, fake: str, body: dict[str, object], primary: str
) -> None:
    statuses, took = sequential(router, {**BODY, **body}, 1000)
    assert statuses == {200: 1000}
    # Asked again once a second (rate_limit_skip_seconds), not on every request.
    assert 1 <= hits(fake)[primary] <= 1 + int(took / 1.0), took


def test_retry_after_ends_and_the_primary_is_asked_again(router: Router, fake: str) -> None:
    body = {**BODY, "model": "ra2/primary", "models": ["ra2/fallback"]}
    with httpx.Client(headers=router.headers(), timeout=30) as client:
        started = time.monotonic()
        assert client.post(f"{router.api}/completions", json=body).status_code == 200
        while time.monotonic() - started < 1.9:
            r = client.post(f"{router.api}/completions", json=body)
            assert r.headers["x-llmrouter-attempts"].startswith("live/ra2-fallback ok")
            time.sleep(0.05)
        assert hits(fake)["ra2-primary"] == 1
        time.sleep(2.1 - (time.monotonic() - started))
        r = client.post(f"{router.api}/completions", json=body)
    assert r.status_code == 200
    assert r.headers["x-llmrouter-attempts"].startswith("limited2/ra2-primary upstream_rate_limited")
    assert hits(fake)["ra2-primary"] == 2


# -- panic mode: everything in the plan is ejected ----------------------------------------------


@pytest.fixture(scope="module")
def slow_recovery(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    """Cooldowns longer than the test, so that what is ejected stays ejected."""
    tmp = tmp_path_factory.mktemp("panic")
    with serving(tmp, config(fake_upstream, cooldown=60, max_cooldown=120)) as r:
        yield r


def test_when_every_deployment_of_the_plan_is_ejected_one_is_tried_anyway(
    slow_recovery: Router, fake: str
) -> None:
    body = {**BODY, "model": "panic/a", "models": ["panic/b"]}
    httpx.post(f"{fake}/_control", json={"switch": "status-500"})
    with httpx.Client(headers=slow_recovery.headers(), timeout=30) as client:
        for _ in range(5):  # a, b, then a second pass: both are ejected within a few requests
            r = client.post(f"{slow_recovery.api}/completions", json=body)
            assert assert_error(r, 502)["error"]["code"] == "upstream_unavailable"
            if r.headers["x-llmrouter-attempts"].split(", ")[0].endswith(" panic"):
                break
        before = hits(fake)
        assert before["panic-a"] >= CONSECUTIVE_FAILURES and before["panic-b"] >= CONSECUTIVE_FAILURES
        # Everything is out: one attempt anyway, at the deployment whose cooldown ends first
        # (panic-a's: it was ejected first), and the attempts header says why.
        for _ in range(3):
            r = client.post(f"{slow_recovery.api}/completions", json=body)
            assert_error(r, 502)
            (attempt,) = r.headers["x-llmrouter-attempts"].split(", ")
            target, outcome, _ms, note = attempt.split()
            assert (target, outcome, note) == ("flip/panic-a", "upstream_unavailable", "panic")
        assert hits(fake) - before == {"panic-a": 3}
        # The upstream recovers: the panic attempt succeeds and brings panic-a back at once.
        httpx.post(f"{fake}/_control", json={"switch": "ok"})
        r = client.post(f"{slow_recovery.api}/completions", json=body)
        assert r.status_code == 200
        assert r.headers["x-llmrouter-attempts"].startswith("flip/panic-a ok")
        assert r.headers["x-llmrouter-attempts"].endswith(" panic")
        r = client.post(f"{slow_recovery.api}/completions", json=body)
        assert r.status_code == 200
        assert r.headers["x-llmrouter-attempts"].startswith("flip/panic-a ok")
        assert not r.headers["x-llmrouter-attempts"].endswith(" panic")
    assert hits(fake) - before == {"panic-a": 5}


def test_an_ejected_primary_is_skipped_for_the_fallbacks_the_client_named(
    slow_recovery: Router, fake: str
) -> None:
    body = {**BODY, "model": "seq/bad", "models": ["seq/good"]}
    with httpx.Client(headers=slow_recovery.headers(), timeout=30) as client:
        for _ in range(CONSECUTIVE_FAILURES):
            r = client.post(f"{slow_recovery.api}/completions", json=body)
            assert r.headers["x-llmrouter-attempts"].startswith("dead/seq-bad upstream_unavailable")
        for _ in range(20):
            r = client.post(f"{slow_recovery.api}/completions", json=body)
            assert r.status_code == 200
            assert r.headers["x-llmrouter-attempts"].startswith("live/seq-good ok")
    assert hits(fake)["seq-bad"] == CONSECUTIVE_FAILURES


def test_without_ejection_a_quiet_router_still_falls_back_every_time(tmp_path: Path, fake: str) -> None:
    """No ejection at all: every request needs its fallback, at a pace a quiet router has."""
    cfg = config(fake).replace(
        f"consecutive_failures: {CONSECUTIVE_FAILURES},", "consecutive_failures: 1000000,"
    )
    cfg = cfg.replace("health: {", "health: {min_attempts: 1000000, ")
    with serving(tmp_path, cfg) as router, httpx.Client(headers=router.headers(), timeout=30) as client:
        for _ in range(40):  # 8 a second: within the reserve of 10 retries a second
            r = client.post(f"{router.api}/completions", json={**BODY, "model": "pair/seq"})
            assert r.status_code == 200, r.headers
            assert r.headers["x-llmrouter-attempts"].startswith("dead/pair-seq-bad upstream")
            time.sleep(0.125)


def test_with_no_budget_at_all_the_models_the_client_named_are_still_tried(
    tmp_path: Path, fake: str
) -> None:
    cfg = config(fake).replace("routing:\n", "routing:\n  retry_budget: {ratio: 0, min_per_second: 0}\n")
    body = {**BODY, "model": "pair/seq", "models": ["seq/good"]}
    with serving(tmp_path, cfg) as router:
        r = httpx.post(f"{router.api}/completions", json=body, headers=router.headers(), timeout=30)
    assert r.status_code == 200
    assert [a.split()[:2] for a in r.headers["x-llmrouter-attempts"].split(", ")] == [
        ["dead/pair-seq-bad", "upstream_unavailable"],
        ["live/pair-seq-good", "retry_budget_exhausted"],  # the same model's other deployment
        ["live/seq-good", "ok"],  # the model the client named: its first attempt is free
    ]
