"""How one model's deployments are ordered for a request, per the model's `strategy` (or the
request's `provider.sort`). Each strategy returns every deployment, best first; the executor walks
that order, skipping those out of rotation, so the later ones are the fallbacks.

`prefix_affinity` is for fleets of self-hosted replicas (vLLM, SGLang, llama.cpp) whose prefix (KV)
caches pay off when prompts that share a beginning go to the same replica. It is weighted
rendezvous hashing (highest random weight): each deployment scores `-weight / ln(u)`, with `u` in
(0, 1) a hash of the prompt's first bytes (or token ids) and the deployment's name, and the order
is by score. The hash is the same in every process, so replicas of the router agree without
talking; removing a deployment moves only the prefixes it held (each to its own second choice),
and adding one takes from each the share its weight asks. An ejected first choice is skipped by
the executor like any other, to the prefix's second choice. A hot prefix must not overload its
replica: once its first deployment in rotation has `spill_after` requests in flight and more than
`max_share` of the model's, the least busy one goes first instead.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from llmrouter.routing.health import HealthBook
from llmrouter.wire.validate import Prompts

if TYPE_CHECKING:
    from llmrouter.routing.plan import Target

__all__ = ["order_targets", "prefix_key"]

# Deployments of one model, best first, for one request.
Ordering = Callable[[Sequence["Target"], HealthBook, random.Random, Prompts], list["Target"]]


def _ordered(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    return sorted(targets, key=lambda t: t.deployment.priority)  # stable: file order breaks ties


def _weighted(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    """A random order in which each deployment comes first with probability weight / total
    (Efraimidis-Spirakis: sort by u^(1/w), largest first)."""
    keys = [math.log(1.0 - rng.random()) / t.deployment.weight for t in targets]
    return [t for _, t in sorted(zip(keys, targets, strict=True), key=lambda kt: -kt[0])]


def _price(target: Target) -> float:
    pricing = target.pricing
    return pricing.prompt + pricing.completion


def _lowest_cost(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    return sorted(targets, key=_price)


def _lowest_latency(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    # Unknown latency sorts first: a deployment nobody has measured gets measured.
    return sorted(targets, key=lambda t: health.latency(t.label) or 0.0)


def _highest_throughput(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    return sorted(targets, key=lambda t: -(health.throughput(t.label) or math.inf))


def _least_busy(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    shuffled = list(targets)
    rng.shuffle(shuffled)  # ties go to a random one, not always the first in the file
    return sorted(shuffled, key=lambda t: health.in_flight(t.label))


def prefix_key(prompts: Prompts, prefix_bytes: int, prefix_tokens: int) -> bytes:
    """What identifies a request's prefix: the first bytes of its first prompt (UTF-8), or the
    first token ids of a token-id prompt. (The router does not tokenize text to route it.)"""
    if not prompts:
        return b""
    first = prompts[0]
    if isinstance(first, str):
        return first[:prefix_bytes].encode()[:prefix_bytes]  # no more than that many characters
    return b"#" + ",".join(map(str, first[:prefix_tokens])).encode()


def _unit(prefix: bytes, label: str) -> float:
    """A hash of the prefix and the deployment, uniform in (0, 1): 52 bits and a half, so that
    the float is exact and never 0 or 1."""
    digest = hashlib.blake2b(label.encode(), digest_size=8, key=prefix).digest()
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2.0**52


def _prefix_affinity(
    targets: Sequence[Target], health: HealthBook, rng: random.Random, prompts: Prompts
) -> list[Target]:
    affinity = targets[0].model.affinity
    digest = hashlib.blake2b(
        prefix_key(prompts, affinity.prefix_bytes, affinity.prefix_tokens), digest_size=32
    ).digest()  # a fixed-size key for the per-deployment hashes
    scores = [-t.deployment.weight / math.log(_unit(digest, t.label)) for t in targets]
    ordered = [t for _, t in sorted(zip(scores, targets, strict=True), key=lambda st: -st[0])]
    live = [t for t in ordered if health.available(t.label)]
    if len(live) < 2:
        return ordered
    chosen = live[0]
    busy = health.in_flight(chosen.label)
    total = sum(health.in_flight(t.label) for t in targets)
    if busy < affinity.spill_after or busy <= affinity.max_share * total:
        return ordered
    idlest = min(live, key=lambda t: health.in_flight(t.label))  # (the first of equals)
    return [idlest, *(t for t in ordered if t is not idlest)]


_STRATEGIES: dict[str, Ordering] = {
    "ordered": _ordered,
    "weighted": _weighted,
    "lowest_cost": _lowest_cost,
    "lowest_latency": _lowest_latency,
    "least_busy": _least_busy,
    "prefix_affinity": _prefix_affinity,
    # The request's `provider.sort` values:
    "price": _lowest_cost,
    "latency": _lowest_latency,
    "throughput": _highest_throughput,
}


def order_targets(
    strategy: str,
    targets: Sequence[Target],
    health: HealthBook,
    rng: random.Random,
    prompts: Prompts = (),
) -> list[Target]:
    if len(targets) == 1:
        return list(targets)
    return _STRATEGIES[strategy](targets, health, rng, prompts)
