"""The retry budget: how many attempts beyond their first the requests of this process may make.

Its job is to keep an outage from becoming a retry storm against the providers that are left,
without ever refusing a fallback to a router that is merely quiet. This is Finagle's `RetryBudget`:
every request deposits `ratio` of a retry, every retry withdraws one, both expire `ttl_seconds`
later, and a reserve of `min_per_second * ttl_seconds` retries is always there. So at any moment
the retries of the last `ttl_seconds` are at most `ratio` of that time's requests plus the reserve.

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

The balance is exact: amounts are integer thousandths of a retry (200 requests at 0.2 deposit
exactly 40 retries), kept per millisecond in a queue that drops each one `ttl_seconds` after it
(Finagle expires whole slices of the TTL at once, which lets a window that straddles an expiry see
twice the reserve). The queue holds at most one entry a millisecond, whatever the traffic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["RetryBudget"]

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
        self._ttl_ms = round(ttl_seconds * 1000)
        self._clock = clock
        self._entries: deque[list[int]] = deque()  # [millisecond, amount], oldest first
        self._sum = 0  # of the entries' amounts

    @property
    def reserve(self) -> int:
        """Retries always allowed in any `ttl_seconds`, whatever the traffic."""
        return self._reserve // _ONE

    def _now(self) -> int:
        """The clock in milliseconds, with what is older than the TTL dropped."""
        now = int(self._clock() * 1000)
        entries, horizon = self._entries, now - self._ttl_ms
        while entries and entries[0][0] <= horizon:
            self._sum -= entries.popleft()[1]
        return now

    def _add(self, now: int, amount: int) -> None:
        entries = self._entries
        if entries and entries[-1][0] == now:
            entries[-1][1] += amount
        else:
            entries.append([now, amount])
        self._sum += amount

    def deposit(self) -> None:
        """A request has arrived."""
        self._add(self._now(), self._deposit)

    def try_withdraw(self) -> bool:
        """May one more attempt start? If so, it is counted."""
        now = self._now()
        if self._reserve + self._sum < _ONE:
            return False
        self._add(now, -_ONE)
        return True
