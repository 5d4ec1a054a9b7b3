"""The metrics' rules in process: what counts as a fallback, the overhead, and the callbacks."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llmrouter.accounts.ledger import Ledger, Record
from llmrouter.accounts.principal import Principal
from llmrouter.accounts.store import StoreError
from llmrouter.api.pipeline import Accounting
from llmrouter.obs.metrics import Metrics, add_observations, exposition
from llmrouter.routing.plan import Catalog
from llmrouter.routing.streams import Attempt
from llmrouter.settings import Policy, load_settings
from llmrouter.wire.completions import Usage


def catalog(tmp_path: Any) -> Catalog:
    path = tmp_path / "config.yaml"
    path.write_text(
        """
providers:
  a: {kind: openai, base_url: "http://127.0.0.1:9/v1"}
  b: {kind: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  - id: m
    deployments: [{provider: a, model: one}, {provider: b, model: two}]
"""
    )
    from llmrouter.app import build_health, build_providers

    settings = load_settings(path)
    return Catalog(settings, build_providers(settings), build_health(settings))


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    metrics.flush()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(exposition(metrics).decode())
        for s in f.samples
    }


def accounting(attempts: list[Attempt], *, stream: bool = False) -> Accounting:
    principal = Principal(id="key:x", kind="key", name="x", limits=Policy())
    acc = Accounting(principal, model_requested="m", stream=stream, attempts=attempts)
    return acc


def test_a_fallback_is_a_move_from_a_failure_to_another_deployment(tmp_path: Any) -> None:
    cat, metrics = catalog(tmp_path), Metrics()
    cases = [
        [Attempt("a/one", "upstream_unavailable", 5), Attempt("b/two", "ok", 5)],  # 1
        [Attempt("a/one", "upstream_timeout", 5), Attempt("a/one", "ok", 5)],  # same again: 0
        [Attempt("a/one", "cancelled", 5), Attempt("b/two", "ok", 5)],  # a hedge lost: 0
        [Attempt("a/one", "ok", 5)],  # 0
    ]
    for attempts in cases:
        metrics.started("completions")
        metrics.finished(cat, "completions", 200, 0.02, accounting(attempts))
    s = samples(metrics)
    assert s[("llmrouter_fallbacks_total", frozenset({("model", "m")}))] == 1
    one = frozenset({("provider", "a"), ("upstream_model", "one"), ("outcome", "ok")})
    assert s[("llmrouter_upstream_attempts_total", one)] == 2


def test_the_overhead_is_the_request_less_its_upstream_time(tmp_path: Any) -> None:
    cat, metrics = catalog(tmp_path), Metrics()
    acc = accounting([Attempt("a/one", "upstream_unavailable", 10), Attempt("b/two", "ok", 20)])
    metrics.started("completions")
    metrics.finished(cat, "completions", 200, 0.0312, acc)
    s = samples(metrics)
    route = ("route", "completions")
    assert s[("llmrouter_overhead_seconds_sum", frozenset({route}))] == 0.0312 - 0.030
    # A lost hedge ran alongside the winner: its time is not the request's upstream time.
    metrics2 = Metrics()
    acc = accounting([Attempt("a/one", "cancelled", 10), Attempt("b/two", "ok", 20)])
    metrics2.started("completions")
    metrics2.finished(cat, "completions", 200, 0.0212, acc)
    overhead = samples(metrics2)[("llmrouter_overhead_seconds_sum", frozenset({route}))]
    assert abs(overhead - 0.0012) < 1e-9


def test_a_stream_counts_its_first_token_and_each_further_token(tmp_path: Any) -> None:
    cat, metrics = catalog(tmp_path), Metrics()
    acc = accounting([Attempt("a/one", "ok", 40)], stream=True)
    acc.target = cat.targets["m"][0]
    acc.ttft_ms = 50.0
    acc.usage = Usage(3, 11, 14)
    metrics.started("completions")
    metrics.finished(cat, "completions", 200, 1.05, acc)
    s = samples(metrics)
    deployment = frozenset({("model", "m"), ("provider", "a")})
    assert s[("llmrouter_time_to_first_token_seconds_sum", deployment)] == 0.05
    assert abs(s[("llmrouter_time_per_output_token_seconds_sum", deployment)] - 0.1) < 1e-9
    route = frozenset({("route", "completions")})
    assert abs(s[("llmrouter_overhead_seconds_sum", route)] - 0.01) < 1e-9


class _FlakyStore:
    """Refuses the first batch as if the database were away, then takes them."""

    dialect = "sqlite"
    where = "flaky"

    def __init__(self) -> None:
        self.rows: list[Sequence[Any]] = []
        self.calls = 0

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, key: str
    ) -> None:
        self.calls += 1
        if self.calls == 1:
            raise StoreError("flaky: down")
        self.rows.extend(rows)


def test_ledger_write_errors_are_counted() -> None:
    metrics = Metrics()

    async def run() -> None:
        store = _FlakyStore()
        ledger = Ledger(store, on_write_error=metrics.ledger_write_failed)  # type: ignore[arg-type]
        ledger.start()
        now = time.time()
        record = Record(
            request_id="r1",
            principal="key:x",
            model_requested="m",
            latency_ms=1.0,
            status=200,
            created_at=now,
            finished_at=now,
        )
        await ledger.commit(record)
        assert len(store.rows) == 1
        await ledger.aclose()

    asyncio.run(run())
    assert samples(metrics)[("llmrouter_ledger_write_errors_total", frozenset())] == 1


def test_observations_added_at_once_are_what_observing_each_gives() -> None:
    """The flush adds a histogram's tally through prometheus-client's internals: they must give
    the exposition that `observe` would have, for the pinned version."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    rng = random.Random(7)
    values = [rng.choice([0.0, 0.005, 0.3, 2.5, 1e9, rng.random() * 20]) for _ in range(500)]
    buckets = (0.005, 0.01, 0.5, 2.5, 10)
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    each = Histogram("h", "h", ("a",), buckets=buckets, registry=one_by_one).labels("x")
    for v in values:
        each.observe(v)
    metrics = Metrics()
    bounds = (*buckets, float("inf"))
    tally = [0.0] * (len(bounds) + 1)
    for v in values:
        tally[next(i for i, b in enumerate(bounds) if v <= b)] += 1
        tally[-1] += v
    add_observations(Histogram("h", "h", ("a",), buckets=buckets, registry=at_once).labels("x"), tally)
    assert generate_latest(at_once) == generate_latest(one_by_one)
    assert metrics is not None


def test_the_request_path_tallies_and_a_flush_hands_it_over(tmp_path: Any) -> None:
    cat, metrics = catalog(tmp_path), Metrics()
    metrics.started("completions")
    metrics.finished(cat, "completions", 200, 0.02, accounting([Attempt("a/one", "ok", 5)]))
    key = (
        "llmrouter_requests_total",
        frozenset({("route", "completions"), ("model", "m"), ("stream", "false"), ("status", "200")}),
    )
    raw = {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(exposition(metrics).decode())
        for s in f.samples
    }
    assert key not in raw  # tallied, not yet handed over
    assert samples(metrics)[key] == 1
    assert samples(metrics)[key] == 1  # a second flush adds nothing
