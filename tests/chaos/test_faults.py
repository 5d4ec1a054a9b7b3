"""Routing under faults: for every fault of the fake upstream, streamed and not, what the client
sees, how often the upstream was hit, and how long it took."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.traffic import at_once, hits
from tests.conftest import Router, serving
from tests.spec import assert_error, validate

FAULTS = (
    "ok",
    "status-429",
    "status-429-date",
    "status-500",
    "status-502",
    "status-503",
    "hang",
    "hang-after-2",
    "reset-before",
    "reset-after-2",
    "malformed",
    "stream-truncated",
    "stream-error",
    "no-finish",
    "big",
    "wait-close",
    "switch",
    "context-400",
    "refuse",
    "empty-stream",
    "slow-stream",
)


def fault_config(fake: str) -> str:
    # one/FAULT and two/FAULT reach the same fault through different deployments, so that the
    # streamed and unstreamed cases of a test do not share a deployment's health.
    singles = "\n".join(
        f"  - {{id: {name}/{f}, deployments: [{{provider: {p}, model: {f}}}]}}"
        for f in FAULTS
        for name, p in (("one", "f1"), ("two", "f2"))
    )
    return f"""default_model: one/ok
server: {{keepalive_seconds: 10, max_body_bytes: 65536}}
routing:
  max_attempts: 3
  deadline_seconds: 3
  backoff_base_ms: 10
  backoff_max_ms: 40
  retry_budget: {{min_per_second: 100000}}
  seed: 7
  health: {{consecutive_failures: 3, min_attempts: 1000, cooldown_seconds: 1,
            max_cooldown_seconds: 4}}
providers:
  f1: {{kind: openai, base_url: {fake}/v1, timeouts: {{connect: 1, first_token: 1, idle: 1, total: 2}}}}
  f2: {{kind: openai, base_url: {fake}/v1, timeouts: {{connect: 1, first_token: 1, idle: 1, total: 2}}}}
  f3: {{kind: openai, base_url: {fake}/v1}}
  f4: {{kind: openai, base_url: {fake}/v1, timeouts: {{first_token: 30, total: 60}}}}
models:
{singles}
  - id: pair/429
    strategy: ordered
    deployments: [{{provider: f3, model: status-429}}, {{provider: f2, model: ok}}]
  - id: pair/switch
    strategy: ordered
    deployments: [{{provider: f1, model: switch}}, {{provider: f2, model: ok}}]
  - id: hedged
    strategy: ordered
    hedge_after_ms: 200
    deployments: [{{provider: f1, model: slow-ok-1500}}, {{provider: f2, model: ok}}]
  - id: hedged/both-wait
    strategy: ordered
    hedge_after_ms: 200
    deployments: [{{provider: f4, model: wait-close}}, {{provider: f3, model: wait-close}}]
  - id: hedged/loser-waits
    strategy: ordered
    hedge_after_ms: 200
    deployments: [{{provider: f1, model: wait-close}}, {{provider: f2, model: ok}}]
  - {{id: log/first, deployments: [{{provider: f3, model: status-500}}]}}
  - {{id: long/slow-stream, deployments: [{{provider: f4, model: slow-stream}}]}}
  - {{id: ctx/small, context_length: 100, deployments: [{{provider: f3, model: context-400}}]}}
  - {{id: ctx/tiny, context_length: 50, deployments: [{{provider: f3, model: ok}}]}}
  - {{id: ctx/large, context_length: 1000, deployments: [{{provider: f3, model: ok}}]}}
  - id: weighted
    deployments:
      - {{provider: f1, model: ok, weight: 1}}
      - {{provider: f2, model: ok, weight: 3}}
  - id: cheap
    strategy: lowest_cost
    pricing: {{prompt: 1, completion: 1}}
    deployments:
      - {{provider: f1, model: ok}}
      - {{provider: f2, model: ok, pricing: {{prompt: 0.1, completion: 0.1}}}}
      - {{provider: f3, model: ok, pricing: {{prompt: 9, completion: 9}}}}
"""


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    with serving(tmp_path_factory.mktemp("faults"), fault_config(fake_upstream)) as r:
        yield r


def ask(router: Router, model: str, stream: bool, **extra: object) -> tuple[httpx.Response, float]:
    body = {"model": model, "prompt": "Hi", "stream": stream, **extra}
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{router.api}/completions", headers=router.headers(), json=body, timeout=30
    ) as r:
        r.read()
    return r, time.monotonic() - started


def sse_events(r: httpx.Response) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


# -- fault by fault ----------------------------------------------------------------------------

# fault -> (status, error code or None, upstream hits, at most seconds)
BEFORE_ANY_TOKEN = {
    "status-500": (502, "upstream_unavailable", 3, 2.0),
    "status-502": (502, "upstream_unavailable", 3, 2.0),
    "status-503": (502, "upstream_unavailable", 3, 2.0),
    "reset-before": (502, "upstream_unavailable", 3, 2.0),
    "malformed": (502, "upstream_unavailable", 3, 2.0),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", sorted(BEFORE_ANY_TOKEN))
def test_failures_before_the_first_token(faults: Router, fake: str, fault: str, stream: bool) -> None:
    status, code, upstream_hits, seconds = BEFORE_ANY_TOKEN[fault]
    r, took = ask(faults, f"{'two' if stream else 'one'}/{fault}", stream)
    assert assert_error(r, status)["error"]["code"] == code
    assert hits(fake)[fault] == upstream_hits  # retried up to max_attempts, or not at all
    assert took < seconds
    assert len(r.headers["x-llmrouter-attempts"].split(", ")) == upstream_hits, r.headers


def test_429_is_passed_on_with_its_retry_after_and_not_retried(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "one/status-429", True)
    assert assert_error(r, 429)["error"]["code"] == "upstream_rate_limited"
    assert r.headers["retry-after"] == "7"
    r, _ = ask(faults, "one/status-429", False)  # inside the Retry-After: not asked again
    assert assert_error(r, 503)["error"]["code"] == "service_unavailable"
    assert hits(fake) == {"status-429": 1}


def test_retry_after_as_an_http_date_is_honoured(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "one/status-429-date", False)
    assert_error(r, 429)
    assert 1 <= int(r.headers["retry-after"]) <= 3
    r, _ = ask(faults, "one/status-429-date", False)
    assert_error(r, 503)
    assert hits(fake)["status-429-date"] == 1
    time.sleep(3.1)
    r, _ = ask(faults, "one/status-429-date", False)
    assert_error(r, 429)  # asked again once the date has passed
    assert hits(fake)["status-429-date"] == 2


def test_retry_after_sends_traffic_to_the_others_meanwhile(faults: Router, fake: str) -> None:
    first, _ = ask(faults, "pair/429", False)
    assert first.status_code == 200
    assert first.headers["x-llmrouter-attempts"].startswith("f3/status-429 upstream_rate_limited")
    for _ in range(3):
        r, _ = ask(faults, "pair/429", False)
        assert r.status_code == 200
        assert r.headers["x-llmrouter-attempts"].startswith("f2/ok ok")
    assert hits(fake) == {"status-429": 1, "ok": 4}


@pytest.mark.parametrize("stream", [False, True])
def test_a_hanging_upstream_is_cut_at_the_deadline(faults: Router, fake: str, stream: bool) -> None:
    r, took = ask(faults, "two/hang" if stream else "one/hang", stream)
    assert assert_error(r, 504)["error"]["code"] == "deadline_exceeded"
    assert 2.9 < took < 4.5  # the router's deadline is 3 s
    # Streamed or not, three attempts of 1 s (the time to first byte: an upstream that sends no
    # response headers is left then, issue 11), the third cut by the deadline.
    assert hits(fake)["hang"] == 3
    attempts = r.headers["x-llmrouter-attempts"].split(", ")
    assert attempts[-1].split()[1] == "deadline_exceeded"  # not held against the deployment
    assert {a.split()[1] for a in attempts[:-1]} == {"upstream_timeout"}


# fault -> text the client got before the error event
AFTER_THE_FIRST_TOKEN = {
    "hang-after-2": "one two ",
    "reset-after-2": "one two ",
    "stream-truncated": "one two ",
    "stream-error": "one ",
    "no-finish": "one ",
}


@pytest.mark.parametrize("fault", sorted(AFTER_THE_FIRST_TOKEN))
def test_failures_after_the_first_token_end_the_stream(faults: Router, fake: str, fault: str) -> None:
    r, took = ask(faults, f"one/{fault}", True)
    assert r.status_code == 200
    events = sse_events(r)
    text = "".join(e["choices"][0]["text"] for e in events[:-1])  # type: ignore[index]
    assert text == AFTER_THE_FIRST_TOKEN[fault]  # no restart elsewhere: nothing duplicated
    validate(events[-1], "ErrorResponse")
    assert "data: [DONE]" not in r.text
    assert hits(fake)[fault] == 1
    assert took < 2.5  # hang-after-2: cut by the 1 s idle timeout


@pytest.mark.parametrize("fault", ["hang-after-2", "reset-after-2", "stream-error"])
def test_the_same_faults_unstreamed_are_retried(faults: Router, fake: str, fault: str) -> None:
    r, _ = ask(faults, f"one/{fault}", False)
    assert r.status_code in (502, 504)
    assert_error(r, r.status_code)
    assert hits(fake)[fault] >= 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_very_large_answer_passes_whole(faults: Router, fake: str, stream: bool) -> None:
    r, _ = ask(faults, "two/big" if stream else "one/big", stream)
    assert r.status_code == 200
    if stream:
        text = "".join(e["choices"][0]["text"] for e in sse_events(r) if e["choices"])  # type: ignore[index]
    else:
        text = r.json()["choices"][0]["text"]
    assert len(text) == 5_000_000
    assert hits(fake)["big"] == 1


# -- health ------------------------------------------------------------------------------------


def test_ejection_and_recovery_over_time(faults: Router, fake: str) -> None:
    httpx.post(f"{fake}/_control", json={"switch": "status-500"})
    for _ in range(3):  # three failures in a row, each answered by the fallback
        r, _ = ask(faults, "pair/switch", False)
        assert r.status_code == 200
        assert r.headers["x-llmrouter-attempts"].startswith("f1/switch upstream_unavailable")
    for _ in range(3):  # ejected: not asked at all
        r, _ = ask(faults, "pair/switch", False)
        assert r.headers["x-llmrouter-attempts"] == r.headers["x-llmrouter-attempts"].split(",")[0]
        assert r.headers["x-llmrouter-attempts"].startswith("f2/ok ok")
    assert hits(fake)["switch"] == 3
    time.sleep(1.1)  # the first cooldown is 1 s; the probe fails: out for 2 s
    ask(faults, "pair/switch", False)
    assert hits(fake)["switch"] == 4
    ask(faults, "pair/switch", False)
    assert hits(fake)["switch"] == 4
    httpx.post(f"{fake}/_control", json={"switch": "ok"})  # the upstream recovers
    time.sleep(2.1)
    r, _ = ask(faults, "pair/switch", False)  # the probe succeeds
    assert r.headers["x-llmrouter-attempts"].startswith("f1/switch ok")
    for _ in range(3):  # and it takes full traffic again
        r, _ = ask(faults, "pair/switch", False)
        assert r.headers["x-llmrouter-attempts"].startswith("f1/switch ok")
    assert hits(fake)["switch"] == 8


# -- hedging -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_hedging_the_faster_one_wins(faults: Router, fake: str, stream: bool) -> None:
    r, took = ask(faults, "hedged", stream)
    assert r.status_code == 200
    attempts = r.headers["x-llmrouter-attempts"]
    assert attempts.startswith("f2/ok ok"), attempts  # the hedge, started at 200 ms, won
    assert "f1/slow-ok-1500 cancelled" in attempts
    assert 0.2 < took < 1.0
    assert hits(fake) == {"slow-ok-1500": 1, "ok": 1}


def test_hedging_closes_the_loser_s_upstream_request(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "hedged/loser-waits", False)
    answered_at = time.time()
    assert r.status_code == 200
    assert "f1/wait-close cancelled" in r.headers["x-llmrouter-attempts"]
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not httpx.get(f"{fake}/_stats").json()["closed_at"]:
        time.sleep(0.05)
    (closed,) = httpx.get(f"{fake}/_stats").json()["closed_at"]
    assert closed - answered_at < 1.0


def test_client_disconnect_cancels_every_attempt_within_a_second(faults: Router, fake: str) -> None:
    body = {"model": "hedged/both-wait", "prompt": "Hi", "stream": True}

    def leave_early() -> float:
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(f"{faults.api}/completions", headers=faults.headers(), json=body, timeout=0.6)
        return time.time()

    left_at = leave_early()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        closed = httpx.get(f"{fake}/_stats").json()["closed_at"]
        if len(closed) == 2:
            break
        time.sleep(0.05)
    assert hits(fake) == {"wait-close": 2}  # the first attempt and its hedge
    assert len(closed) == 2
    # Both upstream requests would wait 30 s for a first token: only the disconnect ended them.
    assert all(at - left_at < 1.0 for at in closed)
    time.sleep(0.5)
    assert hits(fake) == {"wait-close": 2}  # and nothing was tried after the client left


# -- strategies and preferences ----------------------------------------------------------------


def test_weighted_spreads_first_picks_by_weight(faults: Router, fake: str) -> None:
    firsts: Counter[str] = Counter()
    for _ in range(300):
        r, _ = ask(faults, "weighted", False)
        firsts[r.headers["x-llmrouter-attempts"].split()[0]] += 1
    assert firsts["f2/ok"] / 300 == pytest.approx(0.75, abs=0.08)


def test_provider_preferences(faults: Router, fake: str) -> None:
    def first(**provider: object) -> str:
        r, _ = ask(faults, "cheap", False, provider=provider)
        assert r.status_code == 200, r.text
        return r.headers["x-llmrouter-attempts"].split()[0]

    assert first() == "f2/ok"  # lowest_cost
    assert first(order=["f3", "f1"]) == "f3/ok"
    assert first(only=["f1", "f3"]) == "f1/ok"
    assert first(ignore=["f2"]) == "f1/ok"
    assert first(sort="price", ignore=["f1"]) == "f2/ok"
    r, _ = ask(faults, "pair/switch", False, provider={"order": ["f2"], "allow_fallbacks": False})
    assert r.headers["x-llmrouter-attempts"] == r.headers["x-llmrouter-attempts"].split(",")[0]
    r, _ = ask(faults, "cheap", False, provider={"order": ["nope"]})
    assert_error(r, 400, "provider.order[0]")
    r, _ = ask(faults, "cheap", False, provider={"only": ["f1"], "ignore": ["f1"]})
    assert_error(r, 400, "provider")
    r, _ = ask(faults, "cheap", False, provider={"favourite": "f1"})
    assert_error(r, 400, "provider.favourite")


# -- the retry budget --------------------------------------------------------------------------


def test_retry_budget_under_200_concurrent_requests(tmp_path: Path, fake: str) -> None:
    config = f"""default_model: down
routing:
  max_attempts: 4
  backoff_base_ms: 5
  backoff_max_ms: 20
  # No ejection: the budget alone must hold the storm back.
  health: {{consecutive_failures: 1000000, min_attempts: 1000000}}
providers:
  a: {{kind: openai, base_url: {fake}/v1}}
  b: {{kind: openai, base_url: {fake}/v1}}
models:
  - id: down
    deployments: [{{provider: a, model: status-500}}, {{provider: b, model: status-503}}]
"""
    with serving(tmp_path, config) as router:
        statuses = at_once(router, [{"prompt": "Hi", "max_tokens": 1}] * 200)
    assert set(statuses) <= {502, 503}
    upstream = sum(hits(fake).values())
    # The budget's promise (README): over any 10 s, retries are at most 20% of the requests plus
    # 10 a second (100). Without it, four attempts each would be 800.
    assert upstream <= 200 + 0.2 * 200 + 100, upstream
    assert upstream >= 200 + 100  # every request was tried once, and the reserve was there


def test_retry_budget_under_200_concurrent_requests_that_name_three_models(
    tmp_path: Path, fake: str
) -> None:
    config = f"""routing:
  max_attempts: 6
  backoff_base_ms: 5
  backoff_max_ms: 20
  health: {{consecutive_failures: 1000000, min_attempts: 1000000}}
providers:
  a: {{kind: openai, base_url: {fake}/v1}}
models:
  - {{id: d1, deployments: [{{provider: a, model: status-500}}]}}
  - {{id: d2, deployments: [{{provider: a, model: status-502}}]}}
  - {{id: d3, deployments: [{{provider: a, model: status-503}}]}}
"""
    body = {"model": "d1", "models": ["d2", "d3"], "prompt": "Hi", "max_tokens": 1}
    with serving(tmp_path, config) as router:
        statuses = at_once(router, [body] * 200)
    assert set(statuses) == {502}
    per_deployment = hits(fake)
    # The first attempt at each model a request names is free: one a request at each deployment,
    # never more; everything else (here, second passes) is the budget's 40 + 100.
    assert sum(per_deployment.values()) <= 3 * 200 + 0.2 * 200 + 100, per_deployment
    assert sum(per_deployment.values()) >= 3 * 200 + 100
    assert all(200 <= n <= 200 + 0.2 * 200 + 100 for n in per_deployment.values()), per_deployment


@pytest.mark.parametrize("stream", [False, True])
def test_too_long_for_one_model_goes_to_the_next_model(faults: Router, fake: str, stream: bool) -> None:
    prefix = "two" if stream else "one"
    r, _ = ask(faults, f"{prefix}/context-400", stream, models=[f"{prefix}/ok"])
    assert r.status_code == 200, r.text
    attempts = r.headers["x-llmrouter-attempts"]
    assert attempts.startswith(f"{'f2' if stream else 'f1'}/context-400 context_length_exceeded")
    r, _ = ask(faults, f"{prefix}/context-400", stream)  # nowhere else to go: the client's 400
    assert assert_error(r, 400)["error"]["code"] == "context_length_exceeded"
    assert hits(fake)["context-400"] == 2  # never retried on the same model


def test_a_content_refusal_falls_back(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "one/refuse", False, models=["one/ok"])
    assert r.status_code == 200
    assert r.json()["model"] == "one/ok"
    r, _ = ask(faults, "one/refuse", False)
    assert assert_error(r, 400)["error"]["code"] == "content_filter"
    assert hits(fake)["refuse"] == 2  # once a request: never asked again for the same one


def test_the_log_line_says_why_the_request_went_where_it_went(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "log/first", False, models=["one/ok"])
    assert r.status_code == 200
    request_id = r.json()["id"]
    deadline = time.monotonic() + 2
    line = None
    while line is None and time.monotonic() < deadline:
        line = next(
            (json.loads(x) for x in faults.log.read_text().splitlines() if request_id in x), None
        )
        time.sleep(0.02)
    assert line is not None
    assert [(a["target"], a["outcome"]) for a in line["attempts"]] == [
        ("f3/status-500", "upstream_unavailable"),
        ("f1/ok", "ok"),
    ]
    assert line["model"] == "one/ok" and line["provider"] == "f1" and line["status"] == 200


def test_too_long_prefers_a_model_with_a_larger_context(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "ctx/small", False, models=["ctx/tiny", "ctx/large"])
    assert r.status_code == 200
    assert r.json()["model"] == "ctx/large"  # not ctx/tiny, though it comes first


def test_a_stream_with_nothing_in_it_is_not_committed(faults: Router, fake: str) -> None:
    r, _ = ask(faults, "two/empty-stream", True, models=["two/ok"])
    assert r.status_code == 200
    assert r.headers["x-llmrouter-attempts"].startswith("f2/empty-stream upstream_unavailable")
    assert {e["model"] for e in sse_events(r)} == {"two/ok"}


def test_a_committed_stream_ends_at_the_deadline(faults: Router, fake: str) -> None:
    r, took = ask(faults, "long/slow-stream", True)  # would take 20 s; the deadline is 3 s
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1]["error"]["code"] == "deadline_exceeded"  # type: ignore[index]
    assert 2.9 < took < 4.5


def test_a_model_whose_only_deployment_is_ejected_is_skipped_for_the_request_s_models(
    faults: Router, fake: str
) -> None:
    httpx.post(f"{fake}/_control", json={"switch": "status-500"})
    r, _ = ask(faults, "one/switch", False)  # three failures: ejected
    assert hits(fake)["switch"] == 3
    r, _ = ask(faults, "one/switch", False, models=["one/ok"])
    assert r.status_code == 200
    assert r.headers["x-llmrouter-attempts"] == r.headers["x-llmrouter-attempts"].split(",")[0]
    assert r.headers["x-llmrouter-attempts"].startswith("f1/ok ok")
    r, _ = ask(faults, "one/switch", False)  # alone in its plan: tried anyway, once
    assert r.headers["x-llmrouter-attempts"].endswith(" panic")
    assert hits(fake)["switch"] == 4
