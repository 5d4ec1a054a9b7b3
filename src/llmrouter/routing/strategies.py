"""How one model's deployments are ordered for a request, per the model's `strategy` (or the
request's `provider.sort`). Each strategy returns every deployment, best first; the executor walks
that order, so the later ones are the fallbacks."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llmrouter.routing.health import HealthBook

if TYPE_CHECKING:
    from llmrouter.routing.plan import Target

__all__ = ["order_targets"]


def _ordered(targets: Sequence[Target], health: HealthBook, rng: random.Random) -> list[Target]:
    return sorted(targets, key=lambda t: t.deployment.priority)  # stable: file order breaks ties


def _weighted(targets: Sequence[Target], health: HealthBook, rng: random.Random) -> list[Target]:
    """A random order in which each deployment comes first with probability weight / total
    (Efraimidis-Spirakis: sort by u^(1/w), largest first)."""
    keys = [math.log(1.0 - rng.random()) / t.deployment.weight for t in targets]
    return [t for _, t in sorted(zip(keys, targets, strict=True), key=lambda kt: -kt[0])]


def _price(target: Target) -> float:
    pricing = target.pricing
    return pricing.prompt + pricing.completion


def _lowest_cost(targets: Sequence[Target], health: HealthBook, rng: random.Random) -> list[Target]:
    return sorted(targets, key=_price)


def _lowest_latency(targets: Sequence[Target], health: HealthBook, rng: random.Random) -> list[Target]:
    # Unknown latency sorts first: a deployment nobody has measured gets measured.
    return sorted(targets, key=lambda t: health.latency(t.label) or 0.0)


def _highest_throughput(
    targets: Sequence[Target], health: HealthBook, rng: random.Random
) -> list[Target]:
    return sorted(targets, key=lambda t: -(health.throughput(t.label) or math.inf))


def _least_busy(targets: Sequence[Target], health: HealthBook, rng: random.Random) -> list[Target]:
    shuffled = list(targets)
    rng.shuffle(shuffled)  # ties go to a random one, not always the first in the file
    return sorted(shuffled, key=lambda t: health.in_flight(t.label))


_STRATEGIES: dict[str, Callable[[Sequence[Target], HealthBook, random.Random], list[Target]]] = {
    "ordered": _ordered,
    "weighted": _weighted,
    "lowest_cost": _lowest_cost,
    "lowest_latency": _lowest_latency,
    "least_busy": _least_busy,
    # The request's `provider.sort` values:
    "price": _lowest_cost,
    "latency": _lowest_latency,
    "throughput": _highest_throughput,
}


def order_targets(
    strategy: str, targets: Sequence[Target], health: HealthBook, rng: random.Random
) -> list[Target]:
    if len(targets) == 1:
        return list(targets)
    return _STRATEGIES[strategy](targets, health, rng)
