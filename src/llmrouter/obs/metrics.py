"""Prometheus metrics: a small, fixed set under `llmrouter_`, labelled only from configuration.

Nearly everything is counted once, when a request ends (`Metrics.finished`), from what the request
gathered on its way (its accounting: the model, the deployment that answered, the attempts, the
usage) — so the hot path pays a few dictionary lookups and additions per request, and no
instrumentation is threaded through the road. The rest are counted where they happen (ledger
write errors, Redis errors) through callbacks, and states (in-flight requests, the ledger's
backlog, each deployment's health) are gauges.

Labels come only from the configuration: a model name a client sent that is not configured is
`other`, and there is no label per key, user, address or request (per-key figures are the
ledger's and the dashboard's). The bound on the number of series is in the README.

With `--workers N` the workers write their values to files in one directory
(prometheus-client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`, set by `server.serve` before
the workers start and emptied first), and a scrape of any worker, or of the metrics listener in
the supervisor, adds them up.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import glob
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

if TYPE_CHECKING:
    from llmrouter.api.pipeline import Accounting
    from llmrouter.errors import LlmrouterError
    from llmrouter.routing.plan import Catalog

__all__ = ["CONTENT_TYPE", "MULTIPROCESS_ENV", "Metrics", "exposition", "multiprocess_dir"]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST.encode()
OTHER = "other"

# Each counter's `_created` twin would double the series for a timestamp nobody graphs.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. The whole request and one upstream attempt: from a cached answer to a long generation.
_DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FIRST_TOKEN = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
# The router's own time: from half a millisecond, where a hop on this stack sits.
_OVERHEAD = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

_STATES = ("closed", "half_open", "ejected")
# The gauges' meaning under --workers N: in-flight requests and the ledger's backlog add up over
# the live workers; a deployment's health counts the workers that see it in each state.
_LIVESUM: dict[str, Any] = {"multiprocess_mode": "livesum"}


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


class Metrics:
    """The metrics of one process. Under multiprocess mode its values go to the shared
    directory (and `registry` is None: a scrape collects the directory); otherwise to its own
    registry."""

    def __init__(self) -> None:
        shared = multiprocess_dir() is not None
        self.registry: CollectorRegistry | None = None if shared else CollectorRegistry()
        r = self.registry
        gauge_mode = _LIVESUM if shared else {}

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(f"llmrouter_{name}", doc, labels, registry=r)

        self._bounds: dict[Histogram, tuple[float, ...]] = {}  # each histogram's, with +Inf

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            h = Histogram(f"llmrouter_{name}", doc, labels, buckets=buckets, registry=r)
            self._bounds[h] = (*buckets, math.inf)
            return h

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(f"llmrouter_{name}", doc, labels, registry=r, **gauge_mode)

        self.requests = counter(
            "requests_total", "Requests, by route, model, stream and status.",
            ("route", "model", "stream", "status"),
        )  # fmt: skip
        self.duration = histogram(
            "request_duration_seconds", "Whole requests, first byte in to last byte out.",
            ("route", "model", "stream"), _DURATION,
        )  # fmt: skip
        self.overhead = histogram(
            "overhead_seconds",
            "The router's own time in a request that reached an upstream: the request's time (a "
            "stream's: until its first token) minus the upstream attempts'.",
            ("route",), _OVERHEAD,
        )  # fmt: skip
        self.in_flight = gauge("in_flight_requests", "Requests being handled now.", ("route",))
        self.attempts = counter(
            "upstream_attempts_total", "Attempts at a deployment, by outcome (ok, cancelled, or "
            "the error's code).",
            ("provider", "upstream_model", "outcome"),
        )  # fmt: skip
        self.upstream_duration = histogram(
            "upstream_duration_seconds", "Upstream attempts (a stream's: until its first part).",
            ("provider", "upstream_model"), _DURATION,
        )  # fmt: skip
        self.fallbacks = counter(
            "fallbacks_total", "Moves from a failed attempt to another deployment, by the model "
            "the request named.",
            ("model",),
        )  # fmt: skip
        self.first_token = histogram(
            "time_to_first_token_seconds", "Streams: until the first token was sent.",
            ("model", "provider"), _FIRST_TOKEN,
        )  # fmt: skip
        self.per_token = histogram(
            "time_per_output_token_seconds",
            "Streams: after the first token, the time per further token (once per request).",
            ("model", "provider"), _PER_TOKEN,
        )  # fmt: skip
        self.tokens = counter(
            "tokens_total", "Tokens, by type: prompt, completion, and of those cached (prompt) "
            "and reasoning (completion), where the provider reports them.",
            ("model", "provider", "type"),
        )  # fmt: skip
        self.cost = counter(
            "cost_total", "Spend, in the configured prices' currency.", ("model", "provider")
        )
        self.limit_refusals = counter("limit_refusals_total", "Requests refused by a limit.", ("limit",))
        self.auth_failures = counter(
            "auth_failures_total", "Requests refused for their credential, by reason.", ("reason",)
        )
        self.ledger_backlog = gauge("ledger_backlog", "Ledger records waiting to be written.", ())
        self.ledger_write_errors = counter(
            "ledger_write_errors_total", "Ledger batches the store failed to take.", ()
        )
        self.redis_errors = counter(
            "redis_errors_total", "Failed calls to Redis, by who made them.", ("component",)
        )
        self.health = gauge(
            "deployment_health",
            "Each deployment's state: 1 in the state it is in (under --workers N, the number of "
            "workers that see it so).",
            ("provider", "upstream_model", "state"),
        )
        # Children by label values: `labels()` is the slow part of an increment.
        self._children: dict[tuple[Any, ...], Any] = {}
        # What requests added since the last flush, in plain dictionaries: an addition here is a
        # tenth of prometheus-client's (a lock, a child lookup, a loop over the buckets).
        self._adds: dict[tuple[Any, ...], float] = defaultdict(float)
        self._observed: dict[tuple[Any, ...], list[float]] = {}
        self._running: dict[str, int] = defaultdict(int)  # in-flight requests by route
        self._sampled: set[tuple[str, str]] = set()  # the deployments whose health was set

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values) if values else metric
        return child

    def _observe(self, key: tuple[Any, ...], value: float) -> None:
        """An observation of the histogram `key[0]` with the label values `key[1:]`."""
        bounds = self._bounds[key[0]]
        tally = self._observed.get(key)
        if tally is None:  # a count per bucket, then the sum
            tally = self._observed[key] = [0.0] * (len(bounds) + 1)
        tally[bisect.bisect_left(bounds, value)] += 1
        tally[-1] += value

    def flush(self) -> None:
        """Hand what was tallied to prometheus-client (and so, under multiprocess mode, to the
        shared files). Called each second and before this process serves a scrape."""
        adds, self._adds = self._adds, defaultdict(float)
        observed, self._observed = self._observed, {}
        for (metric, *values), amount in adds.items():
            self._child(metric, *values).inc(amount)
        for (metric, *values), tally in observed.items():
            add_observations(self._child(metric, *values), tally)
        for route, running in self._running.items():
            self._child(self.in_flight, route).set(running)

    # -- counted where they happen -------------------------------------------------------------

    def ledger_write_failed(self) -> None:
        self._adds[(self.ledger_write_errors,)] += 1

    def redis_failed(self, component: str) -> Callable[[], None]:
        """The callback a Redis user calls on each failure."""
        key = (self.redis_errors, component)

        def failed() -> None:
            self._adds[key] += 1

        return failed

    def started(self, route: str) -> None:
        self._running[route] += 1

    def refused(self, error: LlmrouterError) -> None:
        """A request ended in an error: a limit's or the credential's, counted by which."""
        if error.limit is not None:
            self._adds[(self.limit_refusals, error.limit)] += 1
        elif error.status == 401 or error.code == "admin_required":
            self._adds[(self.auth_failures, error.code)] += 1

    def sample(self, catalog: Catalog, backlog: int) -> None:
        """Set the gauges of state (each deployment's health, the ledger's backlog), and flush."""
        health = catalog.health
        sampled = set()
        for target in catalog.all_targets():
            now = health.state(target.label)
            d = target.deployment
            sampled.add((d.provider, d.model))
            for state in _STATES:
                self._child(self.health, d.provider, d.model, state).set(1 if state == now else 0)
        for gone in self._sampled - sampled:  # a reload removed it: it is in no state now
            for state in _STATES:
                self._child(self.health, *gone, state).set(0)
                if self.registry is not None:  # (a shared file cannot lose a series)
                    self.health.remove(*gone, state)
                    del self._children[(id(self.health), *gone, state)]
        self._sampled = sampled
        self.ledger_backlog.set(backlog)
        self.flush()

    # -- counted when a request ends -----------------------------------------------------------

    def finished(
        self,
        catalog: Catalog,
        route: str,
        status: int,
        seconds: float,
        acc: Accounting | None,
    ) -> None:
        self._running[route] -= 1
        adds = self._adds
        if acc is None:  # not a generation
            adds[(self.requests, route, "", "false", str(status))] += 1
            self._observe((self.duration, route, "", "false"), seconds)
            return
        named = catalog.models.get(acc.model_requested)
        model = named.id if named is not None else OTHER
        stream = "true" if acc.stream else "false"
        adds[(self.requests, route, model, stream, str(status))] += 1
        self._observe((self.duration, route, model, stream), seconds)
        upstream_ms = self._attempts(catalog, model, acc)
        if upstream_ms and not acc.stream:  # (a stream's, below: until its first token)
            overhead = max(0.0, seconds - upstream_ms / 1000)
            self._observe((self.overhead, route), overhead)
        target = acc.target
        if target is None:
            return
        answered, provider = target.model.id, target.deployment.provider
        usage = acc.usage
        if acc.stream and acc.ttft_ms is not None:
            ttft = acc.ttft_ms / 1000
            self._observe((self.first_token, answered, provider), ttft)
            overhead = max(0.0, ttft - upstream_ms / 1000)
            self._observe((self.overhead, route), overhead)
            if usage is not None and usage.completion_tokens > 1:
                per = max(0.0, (seconds - ttft) / (usage.completion_tokens - 1))
                self._observe((self.per_token, answered, provider), per)
        if usage is not None:
            tokens = self.tokens
            adds[(tokens, answered, provider, "prompt")] += max(0, usage.prompt_tokens)
            adds[(tokens, answered, provider, "completion")] += max(0, usage.completion_tokens)
            cached = getattr(usage.prompt_tokens_details, "cached_tokens", None)
            if cached:
                adds[(tokens, answered, provider, "cached")] += max(0, cached)
            reasoning = getattr(usage.completion_tokens_details, "reasoning_tokens", None)
            if reasoning:
                adds[(tokens, answered, provider, "reasoning")] += max(0, reasoning)
            cost = acc.cost
            if cost > 0:
                adds[(self.cost, answered, provider)] += cost

    def _attempts(self, catalog: Catalog, model: str, acc: Accounting) -> float:
        """Count the request's attempts; the milliseconds they took until it was answered (or
        its stream opened)."""
        upstream_ms = 0.0
        previous = None
        adds = self._adds
        for attempt in acc.attempts:
            deployment = catalog.deployment_labels.get(attempt.target)
            provider, upstream = deployment if deployment is not None else (OTHER, OTHER)
            adds[(self.attempts, provider, upstream, attempt.outcome)] += 1
            if attempt.ms > 0:  # (an attempt the retry budget refused was never made)
                key = (self.upstream_duration, provider, upstream)
                self._observe(key, attempt.ms / 1000)
                if attempt.outcome != "cancelled":  # a hedge that lost ran alongside
                    upstream_ms += attempt.ms
            if (
                previous is not None
                and previous.outcome not in ("ok", "cancelled")
                and previous.target != attempt.target
            ):
                adds[(self.fallbacks, model)] += 1
            previous = attempt
        return upstream_ms


def add_observations(child: Any, tally: list[float]) -> None:
    """Add many observations to a histogram's child at once: `tally` holds a count per bucket
    (not cumulative, the last for +Inf), then their sum. prometheus-client has no public call
    for it; this is what its `observe` does, once per bucket rather than per observation
    (tests/unit/test_metrics.py checks the two agree, for the pinned version)."""
    for bucket, count in zip(child._buckets, tally, strict=False):
        if count:
            bucket.inc(count)
    child._sum.inc(tally[-1])


def exposition(metrics: Metrics | None) -> bytes:
    """The text a scrape gets: this process's registry, or every worker's files."""
    if metrics is not None and metrics.registry is not None:
        return prometheus_client.generate_latest(metrics.registry)
    directory = multiprocess_dir()
    if directory is None:
        return b""
    _forget_dead(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return prometheus_client.generate_latest(registry)


def _forget_dead(directory: str) -> None:
    """A worker that died (and was replaced) leaves its gauges' files: its in-flight requests
    and its view of health are not anyone's now."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = path.rsplit("_", 1)[-1].removesuffix(".db")
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Listener:
    """The metrics on an address of their own (`metrics.listen`), without a credential: a
    thread of prometheus-client's own server."""

    def __init__(self, address: str, registry: CollectorRegistry | None) -> None:
        host, _, port = address.rpartition(":")
        if registry is None:  # multiprocess mode: every worker's files, the dead ones' gauges not
            registry = CollectorRegistry()
            registry.register(_Workers())
        try:
            self._server, self._thread = prometheus_client.start_http_server(
                int(port), host.strip("[]"), registry=registry
            )
        except (OSError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise OSError(f"cannot serve the metrics on {address}: {reason}") from None

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Workers:
    """Every worker's figures, from the shared directory, as `exposition` reads them."""

    def collect(self) -> Iterator[Any]:
        directory = multiprocess_dir()
        assert directory is not None, "multiprocess mode"
        _forget_dead(directory)
        collector = multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        return iter(collector.collect())  # type: ignore[no-untyped-call]


class _Flushed:
    """Registered first in the registry a listener serves: each scrape has the event loop flush
    what requests tallied, and waits (a moment at most) for it."""

    def __init__(self, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self._metrics, self._loop = metrics, loop

    def collect(self) -> Iterator[Any]:
        async def flush() -> None:
            self._metrics.flush()

        with contextlib.suppress(Exception):  # a loop shutting down: serve what is there
            asyncio.run_coroutine_threadsafe(flush(), self._loop).result(timeout=1.0)
        return iter(())


def start_listener(address: str | None, metrics: Metrics) -> Listener | None:
    """In one process, its metrics' own listener (in this loop's process). Under --workers N the
    supervisor has the listener (`server.serve`), so a worker starts none."""
    if address is None or metrics.registry is None:
        return None
    registry = CollectorRegistry()
    registry.register(_Flushed(metrics, asyncio.get_running_loop()))
    registry.register(metrics.registry)
    return Listener(address, registry)
