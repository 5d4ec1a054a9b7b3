"""A principal's limits: requests and tokens per minute, concurrent requests, and credit.

Requests and tokens per minute are counted in a sliding window of 60 one-second buckets: a request
counted in second `b` stops counting at `b + 60`, so the window is exact to the second and has no
minute boundary where twice the limit could pass. Tokens are reserved at admission from the
request's estimate, and `settle` corrects the reservation to the tokens used -- in the bucket it
was counted in, while that bucket is still inside the window (a request that outlives the window
is not counted again). Each running request holds a lease on a concurrency slot until it is
settled; a lease also ends by itself after `LEASE_SECONDS`, so that a replica that crashed cannot
hold slots for ever.

Credit is spent per period in UTC (a day from midnight, a week from Monday, a month from the 1st;
with no `reset`, for all time). The cost is known only at the end, so each admitted request holds
an estimate of the most it may cost until it is settled (see `api/completions.py`). A request is
refused once the spend and the holds of the requests in flight reach the limit: with a 402 when
the spend alone has, else with a 429 (`credit_held`) to retry when one of them finishes. A
request is never refused for its own estimate alone, so the spend may pass the limit by about the
last admitted request's cost. In Redis, the holds are read at each admission: its cost grows with
the principal's requests in flight (about 0.5 ms at a thousand). The first time a limiter sees a
principal in a period, its counter starts from the ledger (`spent`), so a restart or a flushed
Redis does not hand out the period's credit again.

`RedisLimiter` shares all of it between replicas: one Lua script checks and counts a request in
one round trip, another settles it. `LocalLimiter` is the same in this process, when no Redis is
configured. A principal without limits costs nothing in either: no state, no round trip.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple, Protocol

from llmrouter.accounts.principal import UNLIMITED, Principal
from llmrouter.errors import CreditExhausted, InvalidRequest, RateLimited, ServiceUnavailable
from llmrouter.settings import AccountSettings, Policy, Reset

__all__ = [
    "LEASE_SECONDS",
    "Admission",
    "LimitStatus",
    "Limiter",
    "LocalLimiter",
    "Spent",
    "create_limiter",
    "credit_period",
]

log = logging.getLogger("llmrouter.limits")

# The ledger's total cost for a principal id since a unix time, in currency.
Spent = Callable[[str, float], Awaitable[float]]

WINDOW: Final = 60  # seconds, in one-second buckets
LEASE_SECONDS: Final = 900.0  # a concurrency slot not released by then is freed
_NANO: Final = 1_000_000_000  # credit is counted in integer billionths of the currency
_NANO_MAX: Final = 2**62
_ALL_TIME_TTL: Final = 30 * 86400  # an all-time counter idle this long is rebuilt from the ledger
_PERIODS: Final = {"daily": "day", "weekly": "week", "monthly": "month"}

# What an admission check answers (the Lua script's first reply element).
_OK, _CREDIT_UNKNOWN, _CREDIT, _CONCURRENCY, _REQUESTS, _TOKENS = range(6)


@dataclass(slots=True)
class Admission:
    """A request let in: what `settle` needs to account for it, and the headers for its answer."""

    principal_id: str
    request_id: str
    reserved_tokens: int
    bucket: int  # the unix second its requests and tokens were counted in
    headers: list[tuple[bytes, bytes]]  # X-RateLimit-* for a successful response
    limits: Policy = UNLIMITED
    counted: bool = False  # its request, tokens and slot were recorded (not unlimited, not failed open)
    reserved_credit: int = 0  # nano-units of credit held until it is settled


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """Where a principal stands; None where it has no such limit (nothing is counted then)."""

    requests: int | None  # in the last 60 s
    tokens: int | None  # in the last 60 s, reservations of requests in flight included
    concurrent: int | None
    credit_spent: float | None  # in the current period
    period_start: int  # unix seconds; 0 when the credit limit is for all time
    period_end: int | None


class Limiter(Protocol):
    async def admit(
        self,
        principal: Principal,
        request_id: str,
        estimated_tokens: int,
        estimated_cost: float = 0.0,
    ) -> Admission:
        """Count the request against `principal`'s limits, holding `estimated_cost` of its credit
        until it is settled, or raise RateLimited (429),
        CreditExhausted (402), InvalidRequest (400: the estimate alone exceeds the tokens per
        minute) or ServiceUnavailable (503: the limits cannot be checked and must be)."""

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        """The request is over: correct its token reservation to `tokens`, add `cost` to the
        credit spent in the current period, release its slot. Never raises."""

    async def status(self, principal: Principal) -> LimitStatus: ...

    async def aclose(self) -> None: ...


def create_limiter(
    settings: AccountSettings,
    spent: Spent,
    *,
    clock: Callable[[], float] = time.time,
    lease_seconds: float = LEASE_SECONDS,
    on_redis_error: Callable[[], None] = lambda: None,
) -> Limiter:
    """Shared through Redis when `redis_url` is set, else in this process. `lease_seconds`: the
    longest a request may run (its deadline and a margin), after which its slot frees itself."""
    if settings.redis_url:
        from llmrouter.accounts.redis_limits import RedisLimiter

        return RedisLimiter(
            settings.redis_url,
            settings,
            spent,
            clock=clock,
            lease_seconds=lease_seconds,
            on_error=on_redis_error,
        )
    return LocalLimiter(settings, spent, clock=clock, lease_seconds=lease_seconds)


def credit_period(reset: Reset | None, now: float) -> tuple[int, int | None]:
    """The credit period holding `now`, as unix seconds [start, end), in UTC; (0, None) for all time."""
    if reset is None:
        return 0, None
    day = datetime.fromtimestamp(math.floor(now), UTC).replace(hour=0, minute=0, second=0)
    if reset == "daily":
        start, end = day, day + timedelta(days=1)
    elif reset == "weekly":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    return int(start.timestamp()), int(end.timestamp())


# ---------------------------------------------------------------------------------------------
# What both limiters share: the verdict of the checks, and what it becomes for the caller


class _Verdict(NamedTuple):
    code: int
    requests: int = 0  # in the window: after this request when admitted, before it when refused
    requests_reset: float = 0.0  # seconds until the oldest counted request leaves the window
    tokens: int = 0
    tokens_reset: float = 0.0
    concurrent: int = 0
    credit: int = 0  # nano-units spent in the period
    wait: float = 0.0  # refused: seconds until the request could pass
    reserved: int = 0  # nano-units held by requests in flight


def _has_rate_limits(limits: Policy) -> bool:
    return limits.rpm is not None or limits.tpm is not None or limits.max_concurrent is not None


def _is_limited(limits: Policy) -> bool:
    return _has_rate_limits(limits) or limits.credit_limit is not None


def _check_estimate(limits: Policy, estimated_tokens: int) -> int:
    estimated = max(0, estimated_tokens)
    if limits.tpm is not None and estimated > limits.tpm:
        raise InvalidRequest(
            f"This request may use up to {estimated} tokens, more than the limit of {limits.tpm} "
            "tokens per minute; ask for fewer tokens (max_tokens) or a shorter prompt.",
            code="request_exceeds_tpm",
        )
    return estimated


def _uncounted(principal: Principal, request_id: str, now: float) -> Admission:
    return Admission(principal.id, request_id, 0, math.floor(now), [], principal.limits, counted=False)


async def _spent_from_ledger(
    spent: Spent, principal_id: str, since: float, settings: AccountSettings
) -> int | None:
    """The ledger's spend since a period began, in nano-units, to start a credit counter with.
    The ledger unavailable: a 503 (credits fail closed), or None to admit without the credit
    check (fail open); logged either way."""
    try:
        return _to_nano(await spent(principal_id, since))
    except Exception as exc:
        log.warning("the ledger is unavailable (%r): cannot start %s's credit", exc, principal_id)
        if not settings.credits_fail_open:
            raise ServiceUnavailable("Cannot check credits: the ledger is unavailable.") from None
        return None


def _to_nano(amount: float) -> int:
    """Currency as integer nano-units, within Redis's 64-bit integers (an absurd cost from an
    absurd usage saturates rather than failing)."""
    nano = amount * _NANO
    return _NANO_MAX if not math.isfinite(nano) or nano >= _NANO_MAX else round(nano)


def _seconds(delta: float) -> int:
    return max(1, math.ceil(delta))


def _rate_limited(message: str, which: str, limit: int, used: int, wait: float) -> RateLimited:
    error = RateLimited(message, retry_after=wait)
    error.limit = which
    error.extra_headers = [
        (b"x-ratelimit-limit", str(limit).encode()),
        (b"x-ratelimit-remaining", str(max(0, limit - used)).encode()),
        (b"x-ratelimit-reset", str(_seconds(wait)).encode()),
    ]
    return error


def _conclude(
    principal: Principal, request_id: str, estimated: int, now: float, v: _Verdict, reserve: int = 0
) -> Admission:
    """The admission for a request the checks let in, or the error for one they refused."""
    limits = principal.limits
    if v.code == _CREDIT:
        assert limits.credit_limit is not None
        spent = v.credit / _NANO
        if v.credit < _to_nano(limits.credit_limit):  # not spent: held until requests finish
            held = RateLimited(
                f"Credit limit of {limits.credit_limit:g} is held by requests in flight (spent "
                f"{spent:.6g}, {v.reserved / _NANO:.6g} held); retry when one of them has finished.",
                code="credit_held",
                retry_after=1.0,
            )
            held.limit = "credit_held"
            raise held
        message = f"Credit limit of {limits.credit_limit:g} reached (spent {spent:.6g})"
        _, end = credit_period(limits.reset, now)
        if limits.reset is not None and end is not None:
            resets = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M UTC")
            message += f" for this {_PERIODS[limits.reset]}; it resets at {resets}"
        exhausted = CreditExhausted(message + ".")
        exhausted.limit = "credit"
        raise exhausted
    if v.code == _CONCURRENCY:
        assert limits.max_concurrent is not None
        n = limits.max_concurrent
        raise _rate_limited(
            f"Limit of {n} concurrent requests reached; retry when one of them has finished.",
            "concurrency",
            n,
            v.concurrent,
            v.wait,
        )
    if v.code == _REQUESTS:
        assert limits.rpm is not None
        raise _rate_limited(
            f"Rate limit of {limits.rpm} requests per minute reached; retry in {_seconds(v.wait)} s.",
            "rpm",
            limits.rpm,
            v.requests,
            v.wait,
        )
    if v.code == _TOKENS:
        assert limits.tpm is not None
        raise _rate_limited(
            f"Rate limit of {limits.tpm} tokens per minute reached; retry in {_seconds(v.wait)} s.",
            "tpm",
            limits.tpm,
            v.tokens,
            v.wait,
        )
    if v.code != _OK:
        raise ValueError(f"unknown limiter verdict {v.code}")
    headers: list[tuple[bytes, bytes]] = []
    if limits.rpm is not None:
        headers += _window_headers(b"", limits.rpm, v.requests, v.requests_reset)
    elif limits.tpm is not None:
        headers += _window_headers(b"", limits.tpm, v.tokens, v.tokens_reset)
    if limits.rpm is not None:
        headers += _window_headers(b"-requests", limits.rpm, v.requests, None)
    if limits.tpm is not None:
        headers += _window_headers(b"-tokens", limits.tpm, v.tokens, None)
    reserve = reserve if limits.credit_limit is not None else 0
    return Admission(
        principal.id, request_id, estimated, math.floor(now), headers, limits, True, reserve
    )


def _window_headers(
    suffix: bytes, limit: int, used: int, reset: float | None
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-ratelimit-limit" + suffix, str(limit).encode()),
        (b"x-ratelimit-remaining" + suffix, str(max(0, limit - used)).encode()),
    ]
    if reset is not None:
        headers.append((b"x-ratelimit-reset" + suffix, str(_seconds(reset)).encode()))
    return headers


# ---------------------------------------------------------------------------------------------
# In this process


class _Window:
    """Counts in one-second buckets; bucket `b` counts while `now < b + 60`."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}

    def used(self, now: float) -> int:
        oldest = math.floor(now) - WINDOW + 1
        for stale in [b for b in self.buckets if b < oldest]:
            del self.buckets[stale]
        return sum(self.buckets.values())

    def wait(self, now: float, need: int) -> float:
        """Seconds until `need` units have left the window (call `used` first)."""
        freed = 0
        for b in sorted(self.buckets):
            freed += self.buckets[b]
            if freed >= need:
                return b + WINDOW - now
        return float(WINDOW)

    def reset(self, now: float) -> float:
        """Seconds until the oldest counted unit leaves the window."""
        counted = [b for b, n in self.buckets.items() if n > 0]
        return (min(counted) if counted else math.floor(now)) + WINDOW - now


@dataclass(slots=True)
class _Account:
    requests: _Window
    tokens: _Window
    leases: dict[str, float]  # request id -> when its slot frees itself
    credit_period: tuple[Reset | None, int] | None = None
    credit: int = 0  # nano-units spent in `credit_period`
    in_flight: int = 0  # admitted and not yet settled: the account must not be forgotten
    # Credit held by requests in flight: request id -> (nano-units, when the hold ends by itself).
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)


class LocalLimiter:
    """The limits in this process (one event loop): for a single replica without Redis."""

    def __init__(
        self,
        settings: AccountSettings,
        spent: Spent,
        *,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self._settings = settings
        self._spent = spent
        self._clock = clock
        self._lease_seconds = lease_seconds
        self._accounts: dict[str, _Account] = {}
        self._swept = clock()

    def _account(self, principal_id: str, now: float) -> _Account:
        if now - self._swept >= WINDOW:
            self._sweep(now)
        account = self._accounts.get(principal_id)
        if account is None:
            account = self._accounts[principal_id] = _Account(_Window(), _Window(), {})
        return account

    def _sweep(self, now: float) -> None:
        """Forget principals with nothing in their windows and no request running, so that many
        short-lived principals (JWT subjects) do not grow memory: their credit, if any, starts
        from the ledger again the next time."""
        self._swept = now
        idle = [
            principal_id
            for principal_id, a in self._accounts.items()
            if not a.in_flight and not a.requests.used(now) and not a.tokens.used(now)
        ]
        for principal_id in idle:
            del self._accounts[principal_id]

    async def admit(
        self,
        principal: Principal,
        request_id: str,
        estimated_tokens: int,
        estimated_cost: float = 0.0,
    ) -> Admission:
        limits = principal.limits
        estimated = _check_estimate(limits, estimated_tokens)
        if not _is_limited(limits):
            return _uncounted(principal, request_id, 0.0)
        now = self._clock()
        account = self._account(principal.id, now)
        credit_limit = None if limits.credit_limit is None else _to_nano(limits.credit_limit)
        period = _period_key(limits.reset, now)
        if credit_limit is not None and account.credit_period != period:
            spent = await _spent_from_ledger(self._spent, principal.id, period[1], self._settings)
            if spent is None:
                credit_limit = None
            else:
                # Unless another request started this period (or a later one) meanwhile.
                account = self._account(principal.id, now)  # a sweep may have dropped it
                held = account.credit_period
                if held is None or held[0] != period[0] or held[1] < period[1]:
                    account.credit_period, account.credit = period, spent
        # From here on, nothing awaits: the checks and the counting are one step.
        reserve = _to_nano(estimated_cost) if credit_limit is not None else 0
        verdict = self._check(account, limits, request_id, estimated, now, credit_limit, reserve)
        admission = _conclude(principal, request_id, estimated, now, verdict, reserve)
        account.in_flight += 1
        return admission

    def _check(
        self,
        account: _Account,
        limits: Policy,
        request_id: str,
        estimated: int,
        now: float,
        credit_limit: int | None,  # nano-units; None: not checked
        reserve: int,  # nano-units this request holds while it runs
    ) -> _Verdict:
        held = 0
        if credit_limit is not None:
            for ended in [r for r, (_, until) in account.holds.items() if until <= now]:
                del account.holds[ended]
            held = sum(amount for amount, _ in account.holds.values())
            if account.credit + held >= credit_limit:
                return _Verdict(_CREDIT, credit=account.credit, reserved=held)
        running = 0
        if limits.max_concurrent is not None:
            for expired in [r for r, until in account.leases.items() if until <= now]:
                del account.leases[expired]
            running = len(account.leases)
            if running >= limits.max_concurrent:
                return _Verdict(_CONCURRENCY, concurrent=running, wait=1.0)
        requests = tokens = 0
        if limits.rpm is not None:
            requests = account.requests.used(now)
            if requests + 1 > limits.rpm:
                wait = account.requests.wait(now, requests + 1 - limits.rpm)
                return _Verdict(_REQUESTS, requests=requests, wait=wait)
        if limits.tpm is not None:
            tokens = account.tokens.used(now)
            if tokens + estimated > limits.tpm:
                wait = account.tokens.wait(now, tokens + estimated - limits.tpm)
                return _Verdict(_TOKENS, requests=requests, tokens=tokens, wait=wait)
        second = math.floor(now)
        if limits.rpm is not None:
            account.requests.buckets[second] = account.requests.buckets.get(second, 0) + 1
            requests += 1
        if limits.tpm is not None:
            account.tokens.buckets[second] = account.tokens.buckets.get(second, 0) + estimated
            tokens += estimated
        if limits.max_concurrent is not None:
            account.leases[request_id] = now + self._lease_seconds
            running += 1
        if reserve:
            account.holds[request_id] = (reserve, now + self._lease_seconds)
        return _Verdict(
            _OK,
            requests=requests,
            requests_reset=account.requests.reset(now),
            tokens=tokens,
            tokens_reset=account.tokens.reset(now),
            concurrent=running,
            credit=account.credit,
        )

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        try:
            limits = admission.limits
            account = self._accounts.get(admission.principal_id)
            if account is None:
                return
            now = self._clock()
            if admission.counted:
                account.leases.pop(admission.request_id, None)
                account.holds.pop(admission.request_id, None)
                account.in_flight = max(0, account.in_flight - 1)
            correction = tokens - admission.reserved_tokens
            buckets = account.tokens.buckets
            in_window = admission.bucket > math.floor(now) - WINDOW and admission.bucket in buckets
            if admission.counted and limits.tpm is not None and correction and in_window:
                buckets[admission.bucket] += correction
            # Into the period it was admitted in, and only into a counter already started from
            # the ledger, as with Redis.
            started = account.credit_period == _period_key(limits.reset, admission.bucket)
            if limits.credit_limit is not None and cost and started:
                account.credit += _to_nano(cost)
        except Exception:
            log.warning("cannot settle request %s", admission.request_id, exc_info=True)

    async def status(self, principal: Principal) -> LimitStatus:
        limits = principal.limits
        now = self._clock()
        start, end = credit_period(limits.reset, now)
        account = self._accounts.get(principal.id) or _Account(_Window(), _Window(), {})
        credit: float | None = None
        if limits.credit_limit is not None:
            if account.credit_period == _period_key(limits.reset, now):
                credit = account.credit / _NANO
            else:
                credit = await self._spent(principal.id, start)
        running = sum(1 for until in account.leases.values() if until > now)
        return LimitStatus(
            requests=account.requests.used(now) if limits.rpm is not None else None,
            tokens=account.tokens.used(now) if limits.tpm is not None else None,
            concurrent=running if limits.max_concurrent is not None else None,
            credit_spent=credit,
            period_start=start,
            period_end=end,
        )

    async def aclose(self) -> None:
        self._accounts.clear()


def _period_key(reset: Reset | None, now: float) -> tuple[Reset | None, int]:
    return reset, credit_period(reset, now)[0]
