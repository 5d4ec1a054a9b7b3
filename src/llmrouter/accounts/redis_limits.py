"""The limits shared by replicas through Redis: the same semantics as `LocalLimiter` (see
`llmrouter.accounts.limits`), with each check-and-count one Lua script; the scripts asked for in
one turn of the event loop share one round trip (a pipeline).

A principal's keys share one hash tag, so they live in one Redis Cluster slot and a script may
touch all of them. When Redis cannot be reached the request is admitted or refused by the
configured fail-open/fail-closed choice (credits closed, rate limits open by default), and that is
logged every time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from llmrouter.accounts._resp import Pipe
from llmrouter.accounts.limits import (
    _ALL_TIME_TTL,
    _CREDIT_UNKNOWN,
    _NANO,
    LEASE_SECONDS,
    WINDOW,
    Admission,
    LimitStatus,
    Spent,
    _check_estimate,
    _conclude,
    _has_rate_limits,
    _is_limited,
    _spent_from_ledger,
    _to_nano,
    _uncounted,
    _Verdict,
    credit_period,
)
from llmrouter.accounts.principal import Principal
from llmrouter.errors import ServiceUnavailable
from llmrouter.settings import AccountSettings, Policy, Reset

__all__ = ["RedisLimiter", "redis_key_prefix"]

log = logging.getLogger("llmrouter.limits")


def redis_key_prefix(principal_id: str, namespace: str = "llmrouter") -> bytes:
    """`<namespace>:{<id>}:`: the braces make a principal's keys one hash slot in a Redis Cluster.
    The id is kept readable; only `%` and `}` are escaped (`}` would end the hash tag early), and
    an empty id is `%`, as an empty tag would not be one."""
    raw = principal_id.encode("utf-8", "surrogatepass")
    tag = raw.replace(b"%", b"%25").replace(b"}", b"%7D") or b"%"
    return namespace.encode() + b":{" + tag + b"}:"


# KEYS: 1 requests window (hash: second -> count), 2 tokens window (hash: second -> tokens),
#       3 leases (zset: request id scored by lease expiry), 4 credit counter (string, nano-units),
#       5 credit held by requests in flight (hash: request id -> "nano-units:expiry")
# ARGV: 1 now (unix seconds), 2 its second, 3 request id, 4 estimated tokens,
#       5 rpm, 6 tpm, 7 max concurrent, 8 credit limit in nano-units (each -1 when unlimited),
#       9 lease expiry (unix seconds), 10 leases' ttl, 11 credit counter's ttl (0: none),
#       12 the ledger's spend in nano-units to start a missing counter with ('' when not read yet),
#       13 the credit this request holds while it runs, in nano-units ('0': none)
# Reply: {verdict, requests, requests reset ms, tokens, tokens reset ms, concurrent, credit, wait ms,
#         credit held by requests in flight}
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

local credit, held = '0', 0
if credit_limit >= 0 then
  credit = redis.call('GET', KEYS[4])
  if not credit then
    if ARGV[12] == '' then return {1, 0, 0, 0, 0, 0, '0', 0, 0} end
    credit = ARGV[12]
    if ARGV[11] ~= '0' then
      redis.call('SET', KEYS[4], credit, 'EX', ARGV[11])
    else
      redis.call('SET', KEYS[4], credit)
    end
  end
  local holds, ended = redis.call('HGETALL', KEYS[5]), {}
  for i = 1, #holds, 2 do
    local amount, ends = string.match(holds[i + 1], '^(%d+):(.+)$')
    if tonumber(ends) <= now then
      ended[#ended + 1] = holds[i]
    else
      held = held + tonumber(amount)
    end
  end
  if #ended > 0 then redis.call('HDEL', KEYS[5], unpack(ended)) end
  if tonumber(credit) + held >= credit_limit then return {2, 0, 0, 0, 0, 0, credit, 0, held} end
end

local running = 0
if most >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
  running = redis.call('ZCARD', KEYS[3])
  if running >= most then return {3, 0, 0, 0, 0, running, credit, 1000, held} end
end

local requests, requests_live = 0, {}
if rpm >= 0 then
  requests_live, requests = window(KEYS[1])
  if requests + 1 > rpm then
    return {4, requests, 0, 0, 0, running, credit, wait_ms(requests_live, requests + 1 - rpm), held}
  end
end
local tokens, tokens_live = 0, {}
if tpm >= 0 then
  tokens_live, tokens = window(KEYS[2])
  if tokens + estimated > tpm then
    local wait = wait_ms(tokens_live, tokens + estimated - tpm)
    return {5, requests, 0, tokens, 0, running, credit, wait, held}
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
if credit_limit >= 0 and ARGV[13] ~= '0' then
  redis.call('HSET', KEYS[5], ARGV[3], ARGV[13] .. ':' .. ARGV[9])
  redis.call('EXPIRE', KEYS[5], ARGV[10])
end
return {0, requests, reset_ms(requests_live), tokens, reset_ms(tokens_live), running, credit, 0, held}
"""

# KEYS: as for admission.
# ARGV: 1 now, 2 request id, 3 the bucket its tokens were counted in, 4 the tokens' correction,
#       5 cost in nano-units, 6 credit counter's ttl (0: none), 7 '1' to release its slot,
#       8 '1' to end its hold on credit
# A missing credit counter is left missing: the next admission starts it from the ledger.
_SETTLE_LUA = """
if ARGV[7] == '1' then redis.call('ZREM', KEYS[3], ARGV[2]) end
if ARGV[8] == '1' then redis.call('HDEL', KEYS[5], ARGV[2]) end
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


_RELEASE_AFTER = (0.1, 1.0, 5.0)  # seconds between removals of a lost admission's lease


class _Keys(NamedTuple):
    requests: bytes
    tokens: bytes
    leases: bytes
    credit: bytes
    holds: bytes


def _keys(namespace: str, principal_id: str, reset: Reset | None, period_start: int) -> _Keys:
    prefix = redis_key_prefix(principal_id, namespace)
    period = f"{reset}:{period_start}" if reset is not None else "all"
    credit = prefix + b"credit:" + period.encode()
    return _Keys(prefix + b"req", prefix + b"tok", prefix + b"lease", credit, prefix + b"hold")


def _credit_ttl(end: int | None, now: float) -> int:
    return _ALL_TIME_TTL if end is None else math.ceil(end - now) + WINDOW


def _limit(value: int | float | None) -> int:
    return -1 if value is None else int(value)


POOL_CONNECTIONS = 64  # to Redis, per server process
BATCH_MOST = 256  # script runs in one pipeline
_Run = tuple[AsyncScript, list[Any], list[Any], "asyncio.Future[Any]"]  # script, keys, args, reply


class _Batch:
    """The script runs asked for in one turn of the event loop, sent to Redis together: one
    pipeline (not a transaction: each script is atomic by itself; a pipeline runs them in the
    order asked, though the pipelines of a turn past `BATCH_MOST` and the runs again after a
    NOSCRIPT are not ordered with the rest), so one pooled connection, one write and one read
    for the turn's admissions and settlements instead of one of each a run. A caller waits for its
    own reply, or the batch's error, as it would for a call of its own; one that is cancelled
    meanwhile is not waited for, and its script may still run (as a call whose reply was lost may
    have run). A failed batch (a lost
    connection, a timeout) fails each of its runs, as their own calls would have failed.

    At c1 a run waits two loop turns more than a call of its own would (the batch's callback,
    then its task): measured, c1 is as fast as before (bench/README.md)."""

    def __init__(self, redis: Redis, pipe: Pipe | None = None) -> None:
        self._redis = redis
        self._pipe = pipe  # (None: redis-py's pipeline, for a URL `Pipe` does not serve)
        self._asked: list[_Run] = []
        self._sending: set[asyncio.Task[None]] = set()

    def run(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if not self._asked:
            loop.call_soon(self._send_asked, loop)  # after the tasks ready in this turn
        self._asked.append((script, keys, args, reply))
        return reply

    def _send_asked(self, loop: asyncio.AbstractEventLoop) -> None:
        asked, self._asked = self._asked, []
        for start in range(0, len(asked), BATCH_MOST):
            task = loop.create_task(self._send(asked[start : start + BATCH_MOST]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Run]) -> None:
        sent = [entry for entry in batch if not entry[3].done()]  # (not those cancelled already)
        try:
            replies = await self._execute(sent)
            # Scripts Redis forgot (a restart, SCRIPT FLUSH): each loaded once, and the runs that
            # met NOSCRIPT and still have a caller sent again together.
            again = [
                i
                for i, (entry, answer) in enumerate(zip(sent, replies, strict=True))
                if isinstance(answer, NoScriptError) and not entry[3].done()
            ]
            if again:
                for script in {sent[i][0].sha: sent[i][0] for i in again}.values():
                    await self._redis.script_load(script.script)
                for i, answer in zip(again, await self._execute([sent[i] for i in again]), strict=True):
                    replies[i] = answer
            # A reply each, in order, for every run sent, whether or not its caller still waits.
            for (_, _, _, reply), answer in zip(sent, replies, strict=True):
                if reply.done():  # its caller left meanwhile (it gives back what it took)
                    continue
                if isinstance(answer, Exception):
                    reply.set_exception(answer)
                else:
                    reply.set_result(answer)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RedisError("the batch was cancelled")
            for *_, reply in sent:
                if not reply.done():
                    reply.set_exception(failure)
            if not isinstance(exc, Exception):
                raise

    async def _execute(self, runs: list[_Run]) -> list[Any]:
        """The replies of `runs`, sent together (an error reply in its place)."""
        if not runs:
            return []
        if self._pipe is not None:
            commands = [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args, _ in runs]
            return await self._pipe.execute(commands)
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in runs:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        """Send what is asked, and let the batches on their way end (each within the socket
        timeout)."""
        if self._asked:
            self._send_asked(asyncio.get_running_loop())
        if self._sending:
            await asyncio.wait(self._sending)
        if self._pipe is not None:
            await self._pipe.aclose()


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
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._on_error = on_error  # each failed call to Redis (the metrics count them)
        self._namespace = settings.redis_namespace
        self._spent = spent
        self._clock = clock
        self._lease_seconds = lease_seconds
        # No retries inside the client (`Redis()` would make ten): a request waits on Redis for
        # one short timeout at most.
        # No retries inside the client: a failure may come after the script ran (a reply lost
        # with its connection), and running it again would count the request twice. After a Redis
        # restart, each stale pooled connection fails the runs sent through it (one call, or one
        # turn's batch), each open or closed as configured.
        # A bounded pool that waits for a free connection (within the same timeout) rather than
        # raise: redis-py's default pool refuses the 101st concurrent command ("Too many
        # connections"), which here would refuse (or admit unchecked) a burst of requests. Redis
        # runs one command at a time, so a few dozen connections are all a server can use.
        self._redis: Redis = Redis.from_pool(
            BlockingConnectionPool.from_url(
                url,
                max_connections=POOL_CONNECTIONS,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        )
        self._compensations: set[asyncio.Task[None]] = set()
        self._url = url
        self._patient: Redis | None = None  # for giving back slots after a timeout
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)
        self._batch = _Batch(self._redis, Pipe.for_url(url, timeout=socket_timeout))

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
        start, end = credit_period(limits.reset, now)
        reserve = _to_nano(estimated_cost) if limits.credit_limit is not None else 0
        keys = _keys(self._namespace, principal.id, limits.reset, start)
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
            reserve,
        ]
        try:
            reply = await self._admit_once(keys, args, request_id, limits)
            if reply[0] == _CREDIT_UNKNOWN:
                spent = await _spent_from_ledger(self._spent, principal.id, start, self._settings)
                if spent is None:
                    args[7] = -1  # failing open: the rate limits are still checked
                    args[12] = reserve = 0
                else:
                    args[11] = spent
                reply = await self._admit_once(keys, args, request_id, limits)
        except (RedisError, OSError) as exc:
            self._on_error()
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
            reserved=int(reply[8]),
        )
        return _conclude(principal, request_id, estimated, now, verdict, reserve)

    async def _admit_once(self, keys: _Keys, args: list[Any], request_id: str, limits: Policy) -> Any:
        """One run of the admission script. If its answer is lost (a timeout, the request
        cancelled meanwhile), the script may still have taken a concurrency slot: give it back,
        in the background."""
        try:
            return await self._batch.run(self._admit, list(keys), args)
        except BaseException:
            if limits.max_concurrent is not None or limits.credit_limit is not None:
                self._release_later(keys, request_id)
            raise

    def _release_later(self, keys: _Keys, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release(keys, request_id))
        self._compensations.add(task)
        task.add_done_callback(self._compensations.discard)

    async def _release(self, keys: _Keys, request_id: str) -> None:
        """Remove the lease the lost script may have added. Redis may still be busy, and the
        script may run after a first removal (another connection's commands are not ordered
        with it): remove it again later, on a client with a patient timeout."""
        if self._patient is None:
            self._patient = Redis.from_url(self._url, socket_timeout=5, socket_connect_timeout=5)
        for delay in _RELEASE_AFTER:
            await asyncio.sleep(delay)
            try:
                async with self._patient.pipeline(transaction=False) as pipe:
                    pipe.zrem(keys.leases, request_id)
                    pipe.hdel(keys.holds, request_id)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self._on_error()
                log.warning("cannot release %s's slot and credit hold: %s", request_id, exc)

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
        limits = admission.limits
        counted = admission.counted
        cost_nano = _to_nano(cost) if limits.credit_limit is not None else 0
        correction = tokens - admission.reserved_tokens if counted and limits.tpm is not None else 0
        release = counted and limits.max_concurrent is not None
        unhold = counted and admission.reserved_credit > 0
        if not (cost_nano or correction or release or unhold):
            return
        now = self._clock()
        start, end = credit_period(limits.reset, admission.bucket)  # the admission's period
        keys = _keys(self._namespace, admission.principal_id, limits.reset, start)
        try:
            await self._batch.run(
                self._settle,
                list(keys),
                [
                    repr(now),
                    admission.request_id,
                    admission.bucket,
                    correction,
                    cost_nano,
                    _credit_ttl(end, now),
                    "1" if release else "0",
                    "1" if unhold else "0",
                ],
            )
        except Exception:
            self._on_error()
            log.warning("cannot settle request %s", admission.request_id, exc_info=True)
            if release or unhold:  # its slot and hold at least must not wait out the lease
                self._release_later(keys, admission.request_id)

    async def status(self, principal: Principal) -> LimitStatus:
        limits = principal.limits
        now = self._clock()
        start, end = credit_period(limits.reset, now)
        if not _is_limited(limits):
            return LimitStatus(None, None, None, None, start, end)
        keys = _keys(self._namespace, principal.id, limits.reset, start)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.requests)
                pipe.hgetall(keys.tokens)
                pipe.zcount(keys.leases, f"({now!r}", "+inf")
                pipe.get(keys.credit)
                requests, tokens, running, credit = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._on_error()
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
        for task in self._compensations:
            task.cancel()
        await self._batch.aclose()
        await self._redis.aclose()
        if self._patient is not None:
            await self._patient.aclose()


def _window_sum(buckets: dict[bytes, bytes], now: float) -> int:
    oldest = math.floor(now) - WINDOW + 1
    return sum(int(n) for b, n in buckets.items() if int(b) >= oldest)
