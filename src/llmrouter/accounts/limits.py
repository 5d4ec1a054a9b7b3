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
with no `reset`, for all time). A request is refused (402) once the period's spend has reached the
limit; the check is at admission and the cost is known only at the end, so requests in flight may
take the spend past the limit, each by at most its own cost. The first time a limiter sees a
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmrouter.accounts.principal import UNLIMITED, Principal
from llmrouter.errors import CreditExhausted, InvalidRequest, RateLimited, ServiceUnavailable
from llmrouter.settings import AccountSettings, Policy, Reset

__all__ = [
    "LEASE_SECONDS",
    "Admission",
    "LimitStatus",
    "Limiter",
    "LocalLimiter",
    "RedisLimiter",
    "Spent",
    "create_limiter",
    "credit_period",
    "redis_key_prefix",
]

log = logging.getLogger("llmrouter.limits")

# The ledger's total cost for a principal id since a unix time, in currency.
Spent = Callable[[str, float], Awaitable[float]]

WINDOW: Final = 60  # seconds, in one-second buckets
LEASE_SECONDS: Final = 900.0  # a concurrency slot not released by then is freed
_NANO: Final = 1_000_000_000  # credit is counted in integer billionths of the currency
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
    async def admit(self, principal: Principal, request_id: str, estimated_tokens: int) -> Admission:
        """Count the request against `principal`'s limits, or raise RateLimited (429),
        CreditExhausted (402), InvalidRequest (400: the estimate alone exceeds the tokens per
        minute) or ServiceUnavailable (503: the limits cannot be checked and must be)."""

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        """The request is over: correct its token reservation to `tokens`, add `cost` to the
        credit spent in the current period, release its slot. Never raises."""

    async def status(self, principal: Principal) -> LimitStatus: ...

    async def aclose(self) -> None: ...


def create_limiter(
    settings: AccountSettings, spent: Spent, *, clock: Callable[[], float] = time.time
) -> Limiter:
    """Shared through Redis when `redis_url` is set, else in this process."""
    if settings.redis_url:
        return RedisLimiter(settings.redis_url, settings, spent, clock=clock)
    return LocalLimiter(settings, spent, clock=clock)


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


def redis_key_prefix(principal_id: str) -> bytes:
    """`lr:{<id>}:`: the braces make a principal's keys one hash slot in a Redis Cluster. The id
    is kept readable; only `%` and `}` are escaped (`}` would end the hash tag early), and an
    empty id is `%`, as an empty tag would not be one."""
    raw = principal_id.encode("utf-8", "surrogatepass")
    tag = raw.replace(b"%", b"%25").replace(b"}", b"%7D") or b"%"
    return b"lr:{" + tag + b"}:"


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


def _to_nano(amount: float) -> int:
    return round(amount * _NANO)


def _seconds(delta: float) -> int:
    return max(1, math.ceil(delta))


def _rate_limited(message: str, limit: int, used: int, wait: float) -> RateLimited:
    error = RateLimited(message, retry_after=wait)
    error.extra_headers = [
        (b"x-ratelimit-limit", str(limit).encode()),
        (b"x-ratelimit-remaining", str(max(0, limit - used)).encode()),
        (b"x-ratelimit-reset", str(_seconds(wait)).encode()),
    ]
    return error


def _conclude(
    principal: Principal, request_id: str, estimated: int, now: float, v: _Verdict
) -> Admission:
    """The admission for a request the checks let in, or the error for one they refused."""
    limits = principal.limits
    if v.code == _CREDIT:
        assert limits.credit_limit is not None
        spent = v.credit / _NANO
        message = f"Credit limit of {limits.credit_limit:g} reached (spent {spent:.6g})"
        _, end = credit_period(limits.reset, now)
        if limits.reset is not None and end is not None:
            resets = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M UTC")
            message += f" for this {_PERIODS[limits.reset]}; it resets at {resets}"
        raise CreditExhausted(message + ".")
    if v.code == _CONCURRENCY:
        assert limits.max_concurrent is not None
        n = limits.max_concurrent
        raise _rate_limited(
            f"Limit of {n} concurrent requests reached; retry when one of them has finished.",
            n,
            v.concurrent,
            v.wait,
        )
    if v.code == _REQUESTS:
        assert limits.rpm is not None
        raise _rate_limited(
            f"Rate limit of {limits.rpm} requests per minute reached; retry in {_seconds(v.wait)} s.",
            limits.rpm,
            v.requests,
            v.wait,
        )
    if v.code == _TOKENS:
        assert limits.tpm is not None
        raise _rate_limited(
            f"Rate limit of {limits.tpm} tokens per minute reached; retry in {_seconds(v.wait)} s.",
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
    return Admission(principal.id, request_id, estimated, math.floor(now), headers, limits, counted=True)


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

    def _account(self, principal_id: str) -> _Account:
        account = self._accounts.get(principal_id)
        if account is None:
            account = self._accounts[principal_id] = _Account(_Window(), _Window(), {})
        return account

    async def admit(self, principal: Principal, request_id: str, estimated_tokens: int) -> Admission:
        limits = principal.limits
        estimated = _check_estimate(limits, estimated_tokens)
        if not _is_limited(limits):
            return _uncounted(principal, request_id, 0.0)
        account = self._account(principal.id)
        now = self._clock()
        credit_limit = None if limits.credit_limit is None else _to_nano(limits.credit_limit)
        period = _period_key(limits.reset, now)
        if credit_limit is not None and account.credit_period != period:
            try:
                spent = _to_nano(await self._spent(principal.id, period[1]))
            except Exception as exc:
                log.warning(
                    "the ledger is unavailable (%r): cannot start %s's credit", exc, principal.id
                )
                if not self._settings.credits_fail_open:
                    raise ServiceUnavailable(
                        "Cannot check credits: the ledger is unavailable."
                    ) from None
                credit_limit = None
            else:
                # Unless another request started this period (or a later one) meanwhile.
                held = account.credit_period
                if held is None or held[0] != period[0] or held[1] < period[1]:
                    account.credit_period, account.credit = period, spent
        # From here on, nothing awaits: the checks and the counting are one step.
        verdict = self._check(account, limits, request_id, estimated, now, credit_limit)
        return _conclude(principal, request_id, estimated, now, verdict)

    def _check(
        self,
        account: _Account,
        limits: Policy,
        request_id: str,
        estimated: int,
        now: float,
        credit_limit: int | None,  # nano-units; None: not checked
    ) -> _Verdict:
        if credit_limit is not None and account.credit >= credit_limit:
            return _Verdict(_CREDIT, credit=account.credit)
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
            correction = tokens - admission.reserved_tokens
            buckets = account.tokens.buckets
            in_window = admission.bucket > math.floor(now) - WINDOW and admission.bucket in buckets
            if admission.counted and limits.tpm is not None and correction and in_window:
                buckets[admission.bucket] += correction
            # Only into a counter already started from the ledger, as with Redis.
            started = account.credit_period == _period_key(limits.reset, now)
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


# ---------------------------------------------------------------------------------------------
# In Redis, shared by replicas

# KEYS: 1 requests window (hash: second -> count), 2 tokens window (hash: second -> tokens),
#       3 leases (zset: request id scored by lease expiry), 4 credit counter (string, nano-units)
# ARGV: 1 now (unix seconds), 2 its second, 3 request id, 4 estimated tokens,
#       5 rpm, 6 tpm, 7 max concurrent, 8 credit limit in nano-units (each -1 when unlimited),
#       9 lease expiry (unix seconds), 10 leases' ttl, 11 credit counter's ttl (0: none),
#       12 the ledger's spend in nano-units to start a missing counter with ('' when not read yet)
# Reply: {verdict, requests, requests reset ms, tokens, tokens reset ms, concurrent, credit, wait ms}
# The script's 60 and 59 are WINDOW; a window's hash lives 120 s after its last write (room for
# clock skew between replicas). Numbers bound for Redis as arguments (fields, scores, ttls) come
# from ARGV as strings: how Redis prints a Lua number changed between versions.
_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local second = ARGV[2]
local oldest = tonumber(second) - 59
local estimated = tonumber(ARGV[4])
local rpm, tpm, most = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local credit_limit = tonumber(ARGV[8])

local function window(key)
  local raw = redis.call('HGETALL', key)
  local live, stale, total = {}, {}, 0
  for i = 1, #raw, 2 do
    local b = tonumber(raw[i])
    if b < oldest then
      stale[#stale + 1] = raw[i]
    else
      local n = tonumber(raw[i + 1])
      live[#live + 1] = {b, n}
      total = total + n
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  return live, total
end

local function wait_ms(live, need)
  local freed = 0
  for _, bucket in ipairs(live) do
    freed = freed + bucket[2]
    if freed >= need then return math.ceil((bucket[1] + 60 - now) * 1000) end
  end
  return 60000
end

local function reset_ms(live)
  local from = tonumber(second)
  for _, bucket in ipairs(live) do
    if bucket[2] > 0 then from = bucket[1]; break end
  end
  return math.ceil((from + 60 - now) * 1000)
end

local credit = '0'
if credit_limit >= 0 then
  credit = redis.call('GET', KEYS[4])
  if not credit then
    if ARGV[12] == '' then return {1, 0, 0, 0, 0, 0, '0', 0} end
    credit = ARGV[12]
    if ARGV[11] ~= '0' then
      redis.call('SET', KEYS[4], credit, 'EX', ARGV[11])
    else
      redis.call('SET', KEYS[4], credit)
    end
  end
  if tonumber(credit) >= credit_limit then return {2, 0, 0, 0, 0, 0, credit, 0} end
end

local running = 0
if most >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
  running = redis.call('ZCARD', KEYS[3])
  if running >= most then return {3, 0, 0, 0, 0, running, credit, 1000} end
end

local requests, requests_live = 0, {}
if rpm >= 0 then
  requests_live, requests = window(KEYS[1])
  if requests + 1 > rpm then
    return {4, requests, 0, 0, 0, running, credit, wait_ms(requests_live, requests + 1 - rpm)}
  end
end
local tokens, tokens_live = 0, {}
if tpm >= 0 then
  tokens_live, tokens = window(KEYS[2])
  if tokens + estimated > tpm then
    return {5, requests, 0, tokens, 0, running, credit, wait_ms(tokens_live, tokens + estimated - tpm)}
  end
end

if rpm >= 0 then
  redis.call('HINCRBY', KEYS[1], second, 1)
  redis.call('EXPIRE', KEYS[1], 120)
  requests = requests + 1
end
if tpm >= 0 then
  redis.call('HINCRBY', KEYS[2], second, ARGV[4])
  redis.call('EXPIRE', KEYS[2], 120)
  tokens = tokens + estimated
end
if most >= 0 then
  redis.call('ZADD', KEYS[3], ARGV[9], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[10])
  running = running + 1
end
return {0, requests, reset_ms(requests_live), tokens, reset_ms(tokens_live), running, credit, 0}
"""

# KEYS: as for admission.
# ARGV: 1 now, 2 request id, 3 the bucket its tokens were counted in, 4 the tokens' correction,
#       5 cost in nano-units, 6 credit counter's ttl (0: none), 7 '1' to release its slot
# A missing credit counter is left missing: the next admission starts it from the ledger.
_SETTLE_LUA = """
if ARGV[7] == '1' then redis.call('ZREM', KEYS[3], ARGV[2]) end
if ARGV[4] ~= '0' and tonumber(ARGV[3]) > math.floor(tonumber(ARGV[1])) - 60
    and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[4])
end
if ARGV[5] ~= '0' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('INCRBY', KEYS[4], ARGV[5])
  if ARGV[6] ~= '0' then redis.call('EXPIRE', KEYS[4], ARGV[6]) end
end
return 0
"""


class _Keys(NamedTuple):
    requests: bytes
    tokens: bytes
    leases: bytes
    credit: bytes


def _keys(principal_id: str, reset: Reset | None, period_start: int) -> _Keys:
    prefix = redis_key_prefix(principal_id)
    period = f"{reset}:{period_start}" if reset is not None else "all"
    return _Keys(
        prefix + b"req", prefix + b"tok", prefix + b"lease", prefix + b"credit:" + period.encode()
    )


def _credit_ttl(end: int | None, now: float) -> int:
    return _ALL_TIME_TTL if end is None else math.ceil(end - now) + WINDOW


def _limit(value: int | float | None) -> int:
    return -1 if value is None else int(value)


class RedisLimiter:
    """The limits in Redis, shared by every replica using the same Redis."""

    def __init__(
        self,
        url: str,
        settings: AccountSettings,
        spent: Spent,
        *,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
        socket_timeout: float = 0.5,
    ) -> None:
        self._settings = settings
        self._spent = spent
        self._clock = clock
        self._lease_seconds = lease_seconds
        # No retries inside the client (`Redis()` would make ten): a request waits on Redis for
        # one short timeout at most.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)

    async def admit(self, principal: Principal, request_id: str, estimated_tokens: int) -> Admission:
        limits = principal.limits
        estimated = _check_estimate(limits, estimated_tokens)
        if not _is_limited(limits):
            return _uncounted(principal, request_id, 0.0)
        now = self._clock()
        start, end = credit_period(limits.reset, now)
        keys = _keys(principal.id, limits.reset, start)
        args: list[Any] = [
            repr(now),
            math.floor(now),
            request_id,
            estimated,
            _limit(limits.rpm),
            _limit(limits.tpm),
            _limit(limits.max_concurrent),
            -1 if limits.credit_limit is None else _to_nano(limits.credit_limit),
            repr(now + self._lease_seconds),
            math.ceil(self._lease_seconds) + WINDOW,
            _credit_ttl(end, now),
            "",
        ]
        try:
            reply = await self._admit(keys=list(keys), args=args)
            if reply[0] == _CREDIT_UNKNOWN:
                try:
                    args[-1] = _to_nano(await self._spent(principal.id, start))
                except Exception as exc:
                    log.warning(
                        "the ledger is unavailable (%r): cannot start %s's credit", exc, principal.id
                    )
                    if not self._settings.credits_fail_open:
                        raise ServiceUnavailable(
                            "Cannot check credits: the ledger is unavailable."
                        ) from None
                    args[7] = -1  # the rate limits are still checked
                reply = await self._admit(keys=list(keys), args=args)
        except (RedisError, OSError) as exc:
            return self._unavailable(principal, request_id, now, exc)
        verdict = _Verdict(
            code=int(reply[0]),
            requests=int(reply[1]),
            requests_reset=int(reply[2]) / 1000,
            tokens=int(reply[3]),
            tokens_reset=int(reply[4]) / 1000,
            concurrent=int(reply[5]),
            credit=int(reply[6]),
            wait=int(reply[7]) / 1000,
        )
        return _conclude(principal, request_id, estimated, now, verdict)

    def _unavailable(
        self, principal: Principal, request_id: str, now: float, error: Exception
    ) -> Admission:
        """Fail closed or open, as configured, when Redis cannot be asked. The error is logged,
        never sent: it names hosts and ports."""
        limits = principal.limits
        if limits.credit_limit is not None and not self._settings.credits_fail_open:
            log.warning("Redis is unavailable (%s): refusing %s", error, principal.id)
            raise ServiceUnavailable("Cannot check credits: the limits store is unavailable.")
        if _has_rate_limits(limits) and not self._settings.rate_limits_fail_open:
            log.warning("Redis is unavailable (%s): refusing %s", error, principal.id)
            raise ServiceUnavailable("Cannot check rate limits: the limits store is unavailable.")
        log.warning("Redis is unavailable (%s): admitting %s unchecked", error, principal.id)
        return _uncounted(principal, request_id, now)

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        try:
            limits = admission.limits
            counted = admission.counted
            cost_nano = _to_nano(cost) if limits.credit_limit is not None else 0
            correction = tokens - admission.reserved_tokens if counted and limits.tpm is not None else 0
            release = counted and limits.max_concurrent is not None
            if not (cost_nano or correction or release):
                return
            now = self._clock()
            start, end = credit_period(limits.reset, now)
            await self._settle(
                keys=list(_keys(admission.principal_id, limits.reset, start)),
                args=[
                    repr(now),
                    admission.request_id,
                    admission.bucket,
                    correction,
                    cost_nano,
                    _credit_ttl(end, now),
                    "1" if release else "0",
                ],
            )
        except Exception:
            log.warning("cannot settle request %s", admission.request_id, exc_info=True)

    async def status(self, principal: Principal) -> LimitStatus:
        limits = principal.limits
        now = self._clock()
        start, end = credit_period(limits.reset, now)
        if not _is_limited(limits):
            return LimitStatus(None, None, None, None, start, end)
        keys = _keys(principal.id, limits.reset, start)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.requests)
                pipe.hgetall(keys.tokens)
                pipe.zcount(keys.leases, f"({now!r}", "+inf")
                pipe.get(keys.credit)
                requests, tokens, running, credit = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("Redis is unavailable (%s): cannot read %s's limits", exc, principal.id)
            raise ServiceUnavailable("Cannot read limits: the limits store is unavailable.") from None
        spent: float | None = None
        if limits.credit_limit is not None:
            spent = int(credit) / _NANO if credit is not None else await self._spent(principal.id, start)
        return LimitStatus(
            requests=_window_sum(requests, now) if limits.rpm is not None else None,
            tokens=_window_sum(tokens, now) if limits.tpm is not None else None,
            concurrent=int(running) if limits.max_concurrent is not None else None,
            credit_spent=spent,
            period_start=start,
            period_end=end,
        )

    async def aclose(self) -> None:
        await self._redis.aclose()


def _window_sum(buckets: dict[bytes, bytes], now: float) -> int:
    oldest = math.floor(now) - WINDOW + 1
    return sum(int(n) for b, n in buckets.items() if int(b) >= oldest)
