"""The retry budget: how many attempts beyond their first the requests of this process may make.

Its job is to keep an outage from becoming a retry storm against the providers that are left,
without ever refusing a fallback to a router that is merely quiet. This is Finagle's `RetryBudget`:
every request deposits `ratio` of a retry, every retry withdraws one, deposits expire after
`ttl_seconds`, and a reserve of `min_per_second` retries a second is always there. So over any
`ttl_seconds`, retries are at most `ratio` of the requests plus `min_per_second * ttl_seconds`.

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

The balance is kept in `_SLICES` slices of the TTL, in integer thousandths of a retry, so that the
arithmetic is exact (200 requests at 0.2 deposit exactly 40 retries).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RetryBudget"]

_SLICES = 10
_ONE = 1000  # a retry, in thousandths


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
        self._slice = ttl_seconds / _SLICES
        self._clock = clock
        self._epochs = [-1] * _SLICES  # which slice of time each slot holds
        self._amounts = [0] * _SLICES

    @property
    def reserve(self) -> int:
        """Retries always allowed in any `ttl_seconds`, whatever the traffic."""
        return self._reserve // _ONE

    def _slot(self) -> int:
        epoch = int(self._clock() / self._slice)
        slot = epoch % _SLICES
        if self._epochs[slot] != epoch:  # a slot from an earlier TTL: its amounts have expired
            self._epochs[slot] = epoch
            self._amounts[slot] = 0
        return slot

    def _balance(self, epoch: int) -> int:
        oldest = epoch - _SLICES
        live = (a for e, a in zip(self._epochs, self._amounts, strict=True) if e > oldest)
        return self._reserve + sum(live)

    def deposit(self) -> None:
        """A request has arrived."""
        self._amounts[self._slot()] += self._deposit

    def try_withdraw(self) -> bool:
        """May one more attempt start? If so, it is counted."""
        slot = self._slot()
        if self._balance(self._epochs[slot]) < _ONE:
            return False
        self._amounts[slot] -= _ONE
        return True
