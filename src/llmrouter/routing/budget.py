"""The retry budget: how many attempts beyond their first the requests of this process may make.

Its job is to keep an outage from becoming a retry storm against the providers that are left,
without ever refusing a fallback to a router that is merely quiet. This is Finagle's `RetryBudget`:
every request deposits `ratio` of a retry, every retry withdraws one, both expire `ttl_seconds`
later, and a reserve of `min_per_second * ttl_seconds` retries is always there. A retry is allowed
only if, with it, the retries of the last `ttl_seconds` stay within the reserve plus `ratio` of
that time's requests. So over any `ttl_seconds`, the retries are at most the reserve plus `ratio`
of the requests of that time and of the `ttl_seconds` before it (earlier deposits may fund them).

Why this one and not the others the issue names:
- A count of retries per window with a floor of a few (what this module replaced) is used up by a
  handful of fallbacks at low traffic, and then every request that needs one fails.
- Envoy's budget bounds retries *in flight* (at most max(20% of requests in flight, 3)), not how
  many: an upstream that fails in 2 ms can be retried hundreds of times a second within it, and
  eight clients falling back at once get three fallbacks and five errors.
- gRPC's retry throttling spends a token on each failure and earns a tenth on each success, so a
  dead primary in front of a healthy fallback (one failure and one success a request) drains it:
  it starves exactly the case a router exists for.
A deposit per request with a reserve per second has neither hole: below `min_per_second` failures
a second nothing is ever refused, and a storm's extra attempts are a fixed share of its requests.

The balance is kept in `_BUCKETS` buckets of the TTL, in integer millionths of a retry (200
requests at 0.2 deposit exactly 40 retries), and errs on the safe side only: the deposits of the
bucket the TTL's edge falls in are already gone, its withdrawals not yet. (Finagle expires whole
slices at once both ways, which lets a window that straddles an expiry see twice the reserve.)
Memory is fixed whatever the traffic and the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RetryBudget"]

_ONE = 1_000_000  # a retry, in millionths
_BUCKETS = 1000  # of the TTL (10 ms each at 10 s)


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        ttl_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deposit = round(ratio * _ONE)
        self._reserve = round(min_per_second * ttl_seconds * _ONE)
        self._width = ttl_seconds / _BUCKETS
        self._clock = clock
        # One more bucket than the TTL holds: the one its edge falls in, withdrawals still count.
        self._deposits = [0] * (_BUCKETS + 1)
        self._withdrawals = [0] * (_BUCKETS + 1)
        self._deposited = 0  # over the buckets wholly inside the TTL
        self._withdrawn = 0  # over those and the edge's
        self._epoch = int(clock() / self._width)  # the bucket of now

    @property
    def reserve(self) -> int:
        """Retries always allowed in any `ttl_seconds`, whatever the traffic."""
        return self._reserve // _ONE

    def _now(self) -> int:
        """The slot of the present bucket, once the buckets time has left behind are dropped."""
        epoch = int(self._clock() / self._width)
        gap = epoch - self._epoch
        if gap > 0:
            if gap > _BUCKETS:  # idle for a TTL or more: nothing is left
                self._deposits = [0] * (_BUCKETS + 1)
                self._withdrawals = [0] * (_BUCKETS + 1)
                self._deposited = self._withdrawn = 0
            else:  # the buckets now at or past the TTL's edge lose their deposits; past it, all
                self._deposited -= _drop(self._deposits, self._epoch - _BUCKETS + 1, gap)
                self._withdrawn -= _drop(self._withdrawals, self._epoch - _BUCKETS, gap)
            self._epoch = epoch
        return epoch % (_BUCKETS + 1)

    def deposit(self) -> None:
        """A request has arrived."""
        self._deposits[self._now()] += self._deposit
        self._deposited += self._deposit

    def try_withdraw(self) -> bool:
        """May one more attempt start? If so, it is counted."""
        slot = self._now()
        if self._reserve + self._deposited - self._withdrawn < _ONE:
            return False
        self._withdrawals[slot] += _ONE
        self._withdrawn += _ONE
        return True


def _drop(ring: list[int], first: int, count: int) -> int:
    """Zero the `count` slots of `ring` from that of epoch `first` on; return what they held."""
    start = first % len(ring)
    end = start + count
    if end <= len(ring):
        total = sum(ring[start:end])
        ring[start:end] = [0] * count
        return total
    wrapped = end - len(ring)
    total = sum(ring[start:]) + sum(ring[:wrapped])
    ring[start:] = [0] * (len(ring) - start)
    ring[:wrapped] = [0] * wrapped
    return total
