"""What the router knows about each deployment: is it healthy, how fast, how busy.

A deployment is ejected after N consecutive failures, or when its failure rate over a window of
recent attempts is too high. It stays out for a cooldown that doubles with each ejection (capped);
then exactly one probe request may go to it, and only a successful probe brings it back to full
traffic. Separately, an upstream's Retry-After makes the router skip the deployment until then.

State lives in this process behind the `HealthBook` protocol, so that a shared implementation (Redis,
for many replicas) can replace `LocalHealth` without touching the executor.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from llmrouter.settings import HealthSettings

__all__ = ["HealthBook", "HealthState", "LocalHealth"]

# closed: full traffic; ejected: out for its cooldown; half_open: the cooldown is over, and the
# next attempt (one at a time) is the probe that brings it back or ejects it again.
HealthState = Literal["closed", "half_open", "ejected"]

_PROBE_LOST_AFTER = 60.0  # seconds


class HealthBook(Protocol):
    async def start(self) -> None:
        """In the server's event loop, before the first request (a shared book connects)."""

    async def aclose(self) -> None: ...

    def available(self, label: str) -> bool:
        """May an attempt go to `label` now? (No side effect: see `claim`.) An ejected deployment
        whose cooldown is over is available to one probe at a time."""

    def claim(self, label: str) -> None:
        """An attempt starts at `label` now: if it is the probe after a cooldown, no other may
        start until its outcome is recorded (or it is lost, and a later one probes again)."""

    def unavailable_for(self, label: str) -> float:
        """Seconds until `label` may be tried again (0 if it may be now)."""

    def retry_after_for(self, label: str) -> float:
        """Seconds left of the upstream's Retry-After for `label` (0 if none)."""

    def record(self, label: str, ok: bool) -> None:
        """The outcome of an attempt: counts toward ejection, ends a probe."""

    def release(self, label: str) -> None:
        """An attempt ended without saying anything about the deployment's health (cancelled,
        rate-limited, refused): if it was the probe, the next request may probe again."""

    def restore(self, label: str) -> None:
        """`label` answered while it was ejected (it was tried anyway, because every deployment
        of a plan was out): it takes full traffic again, as after a successful probe."""

    def skip_for(self, label: str, seconds: float) -> None:
        """The upstream asked us to wait (Retry-After)."""

    def observe_latency(self, label: str, seconds: float) -> None: ...

    def latency(self, label: str) -> float | None:
        """EWMA of time to first token (or to the answer, when not streamed); None if unknown."""

    def observe_throughput(self, label: str, tokens_per_second: float) -> None: ...

    def throughput(self, label: str) -> float | None: ...

    def started(self, label: str) -> None: ...

    def finished(self, label: str) -> None: ...

    def in_flight(self, label: str) -> int: ...

    def state(self, label: str) -> HealthState:
        """Where `label` stands now (Retry-After skips aside: they are the upstream's, not ours)."""

    def ejections(self, label: str) -> int:
        """How many times in a row `label` has been ejected (0 once it has been long healthy)."""

    def configure(self, settings: HealthSettings, *, alpha: float) -> None:
        """New thresholds and EWMA weight (a config reload): what is known of each deployment
        stays."""


@dataclass(slots=True)
class _State:
    consecutive_failures: int = 0
    recent: deque[bool] = field(default_factory=deque)
    ejections: int = 0
    ejected_until: float = 0.0
    probing: bool = False  # the cooldown is over and one probe is out
    probe_started: float = 0.0
    successes_since_ejection: int = 0
    skip_until: float = 0.0
    latency: float | None = None
    throughput: float | None = None
    in_flight: int = 0


class LocalHealth:
    def __init__(
        self,
        settings: HealthSettings,
        *,
        alpha: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._alpha = alpha
        self._clock = clock
        self._states: dict[str, _State] = {}

    def configure(self, settings: HealthSettings, *, alpha: float) -> None:
        self._settings = settings
        self._alpha = alpha
        for state in self._states.values():
            state.recent = deque(state.recent, maxlen=settings.window)

    async def start(self) -> None:
        return None  # nothing to connect: the state is this process's

    async def aclose(self) -> None:
        return None

    def _state(self, label: str) -> _State:
        state = self._states.get(label)
        if state is None:
            state = self._states[label] = _State(recent=deque(maxlen=self._settings.window))
        return state

    def available(self, label: str) -> bool:
        state = self._state(label)
        now = self._clock()
        if now < state.skip_until or now < state.ejected_until:
            return False
        # A probe whose outcome never came (it was cancelled: a hedge that lost, a client that
        # left) must not keep the deployment out forever.
        return not state.probing or now - state.probe_started > _PROBE_LOST_AFTER

    def claim(self, label: str) -> None:
        state = self._state(label)
        if state.ejected_until:  # half-open: this attempt is the probe
            state.probing = True
            state.probe_started = self._clock()

    def unavailable_for(self, label: str) -> float:
        state = self._state(label)
        return max(0.0, max(state.skip_until, state.ejected_until) - self._clock())

    def retry_after_for(self, label: str) -> float:
        return max(0.0, self._state(label).skip_until - self._clock())

    def record(self, label: str, ok: bool) -> None:
        state = self._state(label)
        s = self._settings
        state.recent.append(ok)
        if ok:
            state.consecutive_failures = 0
            if state.probing:  # the probe came back well: full traffic again
                state.probing = False
                state.ejected_until = 0.0
            state.successes_since_ejection += 1
            if state.successes_since_ejection >= s.window:
                state.ejections = 0  # long healthy: the next ejection starts short again
            return
        if self._clock() < state.ejected_until and not state.probing:
            return  # requests already in flight when it was ejected: no second ejection
        state.consecutive_failures += 1
        state.successes_since_ejection = 0
        failures = state.recent.count(False)
        too_many = state.consecutive_failures >= s.consecutive_failures
        too_often = len(state.recent) >= s.min_attempts and failures / len(state.recent) >= (
            s.failure_rate
        )
        if state.probing or too_many or too_often:
            self._eject(state)

    def _eject(self, state: _State) -> None:
        s = self._settings
        cooldown = min(s.cooldown_seconds * 2**state.ejections, s.max_cooldown_seconds)
        state.ejections += 1
        state.ejected_until = self._clock() + cooldown
        state.probing = False
        state.consecutive_failures = 0
        state.recent.clear()

    def ejection(self, label: str) -> tuple[int, float]:
        """How many ejections in a row `label` has had, and the seconds left of the current one
        (0 if it is not out). A failure that ejects raises the count: that is how a wrapper sees
        the moment of ejection."""
        state = self._state(label)
        return state.ejections, max(0.0, state.ejected_until - self._clock())

    def eject_for(self, label: str, seconds: float, ejections: int) -> None:
        """Another replica ejected `label` for `seconds` more: it is out here too, then one probe
        goes to it here, as if it had been ejected here. The count of ejections is adopted (the
        larger wins), not added to: replicas climb one cooldown ladder together, so a probe that
        fails here takes the next step after the other replica's, not one beyond our own."""
        if seconds <= 0:
            return
        state = self._state(label)
        state.ejections = max(state.ejections, ejections)
        until = self._clock() + min(seconds, self._settings.max_cooldown_seconds)
        if until <= state.ejected_until:
            return
        state.ejected_until = until
        state.probing = False
        state.consecutive_failures = 0
        state.successes_since_ejection = 0
        state.recent.clear()

    def release(self, label: str) -> None:
        self._state(label).probing = False

    def restore(self, label: str) -> None:
        state = self._state(label)
        state.ejected_until = 0.0
        state.probing = False
        state.consecutive_failures = 0

    def skip_for(self, label: str, seconds: float) -> None:
        state = self._state(label)
        state.skip_until = max(state.skip_until, self._clock() + seconds)

    def observe_latency(self, label: str, seconds: float) -> None:
        state = self._state(label)
        state.latency = _ewma(state.latency, seconds, self._alpha)

    def latency(self, label: str) -> float | None:
        return self._state(label).latency

    def observe_throughput(self, label: str, tokens_per_second: float) -> None:
        state = self._state(label)
        state.throughput = _ewma(state.throughput, tokens_per_second, self._alpha)

    def throughput(self, label: str) -> float | None:
        return self._state(label).throughput

    def started(self, label: str) -> None:
        self._state(label).in_flight += 1

    def finished(self, label: str) -> None:
        self._state(label).in_flight -= 1

    def in_flight(self, label: str) -> int:
        return self._state(label).in_flight

    def ejections(self, label: str) -> int:
        state = self._states.get(label)
        return 0 if state is None else state.ejections

    def state(self, label: str) -> HealthState:
        state = self._states.get(label)
        if state is None or not state.ejected_until:
            return "closed"
        return "ejected" if self._clock() < state.ejected_until else "half_open"


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else alpha * new + (1 - alpha) * old
