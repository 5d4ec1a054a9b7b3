"""Deployment health shared by router replicas through Redis.

When one replica ejects a deployment, or an upstream tells it to come back later (Retry-After),
the others should stop sending there too, within a second, instead of each paying for the same
discovery. `SharedHealth` is a `HealthBook` that keeps all of its answers in a `LocalHealth` (the
request path never waits for Redis) and, beside it:

- tells: each local ejection or skip becomes an event, sent by a background task in one script
  that both publishes it on a channel and keeps it in a hash (one field per kind and deployment,
  the later `until` winning), so that a replica that starts later learns what is still in force;
- listens: one task subscribes to the channel, loads the hash, and applies the others' events
  to the `LocalHealth` as if they had been seen here. Its own events are ignored.

Events carry wall-clock (unix) time, the only clock replicas share; it is turned into "seconds
from now" on arrival, so the `LocalHealth` keeps its monotonic clock. Latency, throughput and
in-flight counts stay per replica: they describe this replica's view.

A remote ejection takes the sender's ejection count (the larger wins) rather than adding one:
the replicas climb one cooldown ladder together, so that after the cooldown this replica sends
one probe, and if that fails its next cooldown is the step after the sender's, exactly as if a
single router had seen every failure. Recovery is not shared: each replica probes once.

If Redis cannot be reached, this is a `LocalHealth` with a warning in the log, and the listener
keeps trying (with backoff, reloading the hash each time it is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from typing import Literal

import msgspec
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from llmrouter.routing.health import HealthState, LocalHealth
from llmrouter.settings import HealthSettings

__all__ = ["SharedHealth"]

log = logging.getLogger("llmrouter.health")

_TIMEOUT = 1.0  # connect, and each command: the request path never waits, but tasks end
_START_WAIT = 2.0  # start() waits this long at most for the first subscription
_POLL = 1.0  # the listener wakes this often when the channel is quiet
_RETRY_FIRST, _RETRY_MAX = 0.5, 30.0  # the listener's backoff while Redis is away
_MAX_SENDING = 64  # events on their way to Redis; more are dropped (and logged)
_KEEP_AFTER = 60  # seconds a stored event outlives its `until`

# Keeps the later of two events for the same field, then publishes the new one either way: a
# replica that hears an older event keeps its own later time, so it does no harm.
# KEYS[1]: the hash; ARGV: field, event, until, ttl in ms, channel.
_TELL = """
local function until_of(raw)
  local ok, event = pcall(cjson.decode, raw)
  if ok and type(event) == 'table' then return tonumber(event['until']) end
  return nil
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_until = old and until_of(old)
if not old_until or old_until < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
end
return redis.call('PUBLISH', ARGV[5], ARGV[2])
"""


class _Event(msgspec.Struct, frozen=True):
    label: str
    kind: Literal["eject", "skip"]
    until: float  # unix time
    ejections: int
    origin: str  # the replica that saw it

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.label}"


_decode = msgspec.json.Decoder(_Event).decode


class SharedHealth:
    """A `HealthBook` over `local`, sharing ejections and Retry-After skips through Redis.

    Call `start()` in the server's lifespan, inside its event loop, and `aclose()` on the way out.
    `replica_id` must differ between replicas (and between processes, because a replica ignores
    the events that carry its own id); the default does.
    """

    def __init__(
        self,
        local: LocalHealth,
        redis_url: str,
        *,
        channel: str = "llmrouter:health",
        replica_id: str | None = None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._local = local
        self._on_error = on_error  # each failed call to Redis (the metrics count them)
        self._redis_url = redis_url
        self._channel = channel
        self._key = f"{channel}:latest"
        self._replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._redis: Redis | None = None
        self._tell: AsyncScript | None = None
        self._listener: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._tried = asyncio.Event()  # the listener's first attempt has succeeded or failed
        self._connected = False

    @property
    def replica_id(self) -> str:
        return self._replica_id

    @property
    def key(self) -> str:
        """The Redis hash that keeps the latest events."""
        return self._key

    @property
    def connected(self) -> bool:
        """Is this replica listening to the others right now?"""
        return self._connected

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, subscribe and load what the others know; if Redis does not answer within a
        couple of seconds, go on alone (the listener keeps trying in the background)."""
        if self._redis is not None:
            return
        self._redis = Redis.from_url(
            self._redis_url,
            socket_timeout=_TIMEOUT,
            socket_connect_timeout=_TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # the listener has its own backoff; a lost event is logged
            health_check_interval=10,
            max_connections=_MAX_SENDING + 1,
        )
        self._tell = self._redis.register_script(_TELL)
        self._listener = asyncio.create_task(self._listen(self._redis), name="llmrouter.health")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), _START_WAIT)
        if not self._tried.is_set():  # (a failed attempt has said so already)
            log.warning("deployment health is not shared yet: Redis is slow to answer; retrying")

    async def aclose(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        if self._sending:  # let events already on their way arrive
            _, late = await asyncio.wait(self._sending, timeout=_TIMEOUT)
            for task in late:
                task.cancel()
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()
        self._connected = False

    # -- the request path: LocalHealth answers, Redis hears about changes -------------------

    def available(self, label: str) -> bool:
        return self._local.available(label)

    def claim(self, label: str) -> None:
        self._local.claim(label)

    def unavailable_for(self, label: str) -> float:
        return self._local.unavailable_for(label)

    def retry_after_for(self, label: str) -> float:
        return self._local.retry_after_for(label)

    def record(self, label: str, ok: bool) -> None:
        if ok:  # a success never ejects
            self._local.record(label, ok)
            return
        before, _ = self._local.ejection(label)
        self._local.record(label, ok)
        ejections, seconds = self._local.ejection(label)
        if ejections > before:
            self._tell_others(label, "eject", seconds, ejections)

    def release(self, label: str) -> None:
        self._local.release(label)

    def restore(self, label: str) -> None:  # recovery is not shared: each replica sees its own
        self._local.restore(label)

    def skip_for(self, label: str, seconds: float) -> None:
        self._local.skip_for(label, seconds)
        if seconds > 0:
            self._tell_others(label, "skip", seconds, 0)

    def observe_latency(self, label: str, seconds: float) -> None:
        self._local.observe_latency(label, seconds)

    def latency(self, label: str) -> float | None:
        return self._local.latency(label)

    def observe_throughput(self, label: str, tokens_per_second: float) -> None:
        self._local.observe_throughput(label, tokens_per_second)

    def throughput(self, label: str) -> float | None:
        return self._local.throughput(label)

    def started(self, label: str) -> None:
        self._local.started(label)

    def finished(self, label: str) -> None:
        self._local.finished(label)

    def in_flight(self, label: str) -> int:
        return self._local.in_flight(label)

    def state(self, label: str) -> HealthState:
        return self._local.state(label)

    def ejections(self, label: str) -> int:
        return self._local.ejections(label)

    def configure(self, settings: HealthSettings, *, alpha: float) -> None:
        self._local.configure(settings, alpha=alpha)

    # -- telling ----------------------------------------------------------------------------

    def _tell_others(
        self, label: str, kind: Literal["eject", "skip"], seconds: float, ejections: int
    ) -> None:
        tell = self._tell
        if self._redis is None or tell is None:  # not started, or closed: local only
            return
        if len(self._sending) >= _MAX_SENDING:
            log.warning("not sharing the %s of %s: too many events waiting for Redis", kind, label)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called from outside the server's loop: nothing to send with
            return
        event = _Event(label, kind, time.time() + seconds, ejections, self._replica_id)
        task = loop.create_task(self._send(tell, event))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, tell: AsyncScript, event: _Event) -> None:
        ttl_ms = int((event.until - time.time() + _KEEP_AFTER) * 1000)
        args = (event.field, msgspec.json.encode(event), event.until, ttl_ms, self._channel)
        try:
            async with asyncio.timeout(_TIMEOUT):
                await tell(keys=[self._key], args=args)
        except Exception as exc:  # whatever Redis does, the request path goes on
            self._on_error()
            log.warning("could not share the %s of %s: %s", event.kind, event.label, _describe(exc))

    # -- listening --------------------------------------------------------------------------

    async def _listen(self, redis: Redis) -> None:
        delay = _RETRY_FIRST
        while True:
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    async with asyncio.timeout(_TIMEOUT * 2):
                        await pubsub.subscribe(self._channel)
                        # After subscribing, so that nothing falls between the two; an event
                        # heard twice does no harm.
                        stored = await redis.hgetall(self._key)
                    for raw in stored.values():
                        self._apply(raw)
                    if not self._connected:
                        log.info("sharing deployment health on %s", self._channel)
                    self._connected = True
                    self._tried.set()
                    delay = _RETRY_FIRST
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL)
                        if message is not None and message["type"] == "message":
                            self._apply(message["data"])
            except Exception as exc:  # the listener outlives any Redis failure
                self._on_error()
                if self._connected or not self._tried.is_set():
                    log.warning(
                        "deployment health is local to this replica until Redis is back: %s",
                        _describe(exc),
                    )
                else:
                    log.debug("Redis is still away: %s", _describe(exc))
                self._connected = False
                self._tried.set()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(delay * 2, _RETRY_MAX)

    def _apply(self, raw: bytes | str) -> None:
        try:
            event = _decode(raw)
        except msgspec.DecodeError as exc:
            log.warning("ignoring a malformed health event: %s", exc)
            return
        if event.origin == self._replica_id:
            return
        seconds = event.until - time.time()
        if seconds <= 0:
            return
        if event.kind == "eject":
            self._local.eject_for(event.label, seconds, event.ejections)
        else:
            self._local.skip_for(event.label, seconds)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
