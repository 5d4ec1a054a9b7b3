"""The in-process limiter on a fake clock: sliding windows, token reservations, concurrency leases,
credit periods started from the ledger, and the headers a client sees."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from llmrouter.accounts.limits import (
    LEASE_SECONDS,
    Admission,
    Limiter,
    LocalLimiter,
    create_limiter,
    credit_period,
)
from llmrouter.accounts.principal import Principal
from llmrouter.accounts.redis_limits import RedisLimiter
from llmrouter.errors import CreditExhausted, InvalidRequest, RateLimited, ServiceUnavailable
from llmrouter.settings import AccountSettings, Policy
from tests.fakes.limits import T0, Clock, Ledger, at


def principal(principal_id: str = "key:k1", **limits: Any) -> Principal:
    return Principal(id=principal_id, kind="key", name="k1", limits=Policy(**limits))


def limiter(clock: Clock, ledger: Ledger | None = None, **settings: Any) -> tuple[LocalLimiter, Ledger]:
    ledger = ledger or Ledger()
    return LocalLimiter(AccountSettings(**settings), ledger, clock=clock), ledger


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def admits(lim: LocalLimiter, p: Principal, n: int, tokens: int = 0) -> list[Admission]:
    """Ask `n` times; the admissions (refusals must be RateLimited)."""
    passed = []
    for i in range(n):
        with contextlib.suppress(RateLimited):
            passed.append(await lim.admit(p, f"req-{i}", tokens))
    return passed


def test_exactly_the_rpm_limit_passes() -> None:
    async def main() -> None:
        lim, _ = limiter(Clock())
        p = principal(rpm=7)
        assert len(await admits(lim, p, 20)) == 7
        with pytest.raises(RateLimited) as refused:
            await lim.admit(p, "one-more", 0)
        error = refused.value
        assert error.status == 429
        assert error.message == "Rate limit of 7 requests per minute reached; retry in 60 s."
        assert error.retry_after == pytest.approx(59.75)  # the second it was counted in leaves
        assert error.headers() == [
            (b"retry-after", b"60"),
            (b"x-ratelimit-limit", b"7"),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", b"60"),
        ]
        status = await lim.status(p)
        assert status.requests == 7 and status.tokens is None and status.credit_spent is None

    run(main)


def test_the_window_slides_by_the_second_not_at_the_minute() -> None:
    async def main() -> None:
        clock = Clock()
        lim, _ = limiter(clock)
        p = principal(rpm=5)
        assert len(await admits(lim, p, 2)) == 2  # at hh:00:30.25
        clock.now = T0 + 20
        assert len(await admits(lim, p, 3)) == 3  # at hh:00:50.25
        clock.now = T0 + 30  # hh:01:00.25: a new minute, but the window holds all five
        with pytest.raises(RateLimited) as refused:
            await lim.admit(p, "x", 0)
        assert refused.value.retry_after == pytest.approx(29.75)
        assert refused.value.message.endswith("retry in 30 s.")
        clock.now = T0 + 59.7  # hh:01:29.95: second :30 still counts
        assert await admits(lim, p, 1) == []
        clock.now = T0 + 59.75  # hh:01:30.00: the two of second :30 have left
        assert len(await admits(lim, p, 3)) == 2
        with pytest.raises(RateLimited) as refused:
            await lim.admit(p, "x", 0)
        assert refused.value.retry_after == pytest.approx(20.0)  # until second :50 leaves

    run(main)


def test_no_double_burst_across_a_minute_boundary() -> None:
    async def main() -> None:
        clock = Clock(at(2025, 3, 12, 10, 0, 59) + 0.9)
        lim, _ = limiter(clock)
        p = principal(rpm=10)
        assert len(await admits(lim, p, 10)) == 10
        clock.now = at(2025, 3, 12, 10, 1, 0) + 0.1
        assert await admits(lim, p, 10) == []

    run(main)


def test_tokens_are_reserved_then_corrected() -> None:
    async def main() -> None:
        clock = Clock()
        lim, _ = limiter(clock)
        p = principal(tpm=1000)
        first = await lim.admit(p, "a", 600)
        assert first.reserved_tokens == 600 and first.bucket == int(T0)
        assert (b"x-ratelimit-remaining-tokens", b"400") in first.headers
        with pytest.raises(RateLimited) as refused:
            await lim.admit(p, "b", 600)
        assert refused.value.message.startswith("Rate limit of 1000 tokens per minute reached")
        assert (b"x-ratelimit-remaining", b"400") in refused.value.extra_headers
        clock.now += 5
        await lim.settle(first, 100, 0.0)  # used far fewer than it reserved
        assert (await lim.status(p)).tokens == 100
        second = await lim.admit(p, "b", 600)
        assert (await lim.status(p)).tokens == 700
        clock.now += 61  # the second's bucket has left the window: nothing to correct
        await lim.settle(second, 900, 0.0)
        assert (await lim.status(p)).tokens == 0
        assert len(await admits(lim, p, 1, tokens=1000)) == 1

    run(main)


def test_an_estimate_over_the_tpm_is_a_400_that_counts_nothing() -> None:
    async def main() -> None:
        lim, _ = limiter(Clock())
        p = principal(tpm=100, rpm=10)
        with pytest.raises(InvalidRequest) as refused:
            await lim.admit(p, "a", 101)
        assert refused.value.status == 400 and refused.value.code == "request_exceeds_tpm"
        assert "101" in refused.value.message and "100" in refused.value.message
        status = await lim.status(p)
        assert status.requests == 0 and status.tokens == 0
        assert (await lim.admit(p, "b", 100)).reserved_tokens == 100

    run(main)


def test_concurrency_slots_are_released_by_settle_or_lease_expiry() -> None:
    async def main() -> None:
        clock = Clock()
        lim, _ = limiter(clock)
        p = principal(max_concurrent=2)
        a = await lim.admit(p, "a", 0)
        await lim.admit(p, "b", 0)
        with pytest.raises(RateLimited) as refused:
            await lim.admit(p, "c", 0)
        assert refused.value.retry_after == 1.0
        assert refused.value.message.startswith("Limit of 2 concurrent requests reached")
        assert refused.value.extra_headers == [
            (b"x-ratelimit-limit", b"2"),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", b"1"),
        ]
        assert (await lim.status(p)).concurrent == 2
        await lim.settle(a, 0, 0.0)
        await lim.settle(a, 0, 0.0)  # settling twice frees one slot, not two
        await lim.admit(p, "c", 0)
        with pytest.raises(RateLimited):
            await lim.admit(p, "d", 0)
        clock.now += LEASE_SECONDS  # "b" and "c" were never settled: their leases run out
        await lim.admit(p, "d", 0)
        assert (await lim.status(p)).concurrent == 1

    run(main)


def test_credit_is_refused_when_spent_and_comes_back_next_day() -> None:
    async def main() -> None:
        clock = Clock()
        lim, ledger = limiter(clock)
        p = principal(credit_limit=1.0, reset="daily")
        a = await lim.admit(p, "a", 0)
        await lim.settle(a, 10, 0.6)
        b = await lim.admit(p, "b", 0)  # 0.6 < 1: in, and it may overspend
        await lim.settle(b, 10, 0.6)
        with pytest.raises(CreditExhausted) as refused:
            await lim.admit(p, "c", 0)
        assert refused.value.status == 402
        assert refused.value.message == (
            "Credit limit of 1 reached (spent 1.2) for this day; it resets at 2025-03-13 00:00 UTC."
        )
        assert (await lim.status(p)).credit_spent == pytest.approx(1.2)
        ledger.total = 1.2  # the ledger holds both records by now
        clock.now = at(2025, 3, 12, 23, 59, 59) + 0.999
        with pytest.raises(CreditExhausted):  # forgotten while idle, started from the ledger
            await lim.admit(p, "c", 0)
        ledger.total = 0.0
        clock.now = at(2025, 3, 13)
        await lim.admit(p, "c", 0)
        day = [("key:k1", at(2025, 3, 12))]
        assert ledger.calls == day * 2 + [("key:k1", at(2025, 3, 13))]
        status = await lim.status(p)
        assert (status.credit_spent, status.period_start, status.period_end) == (
            0.0,
            at(2025, 3, 13),
            at(2025, 3, 14),
        )

    run(main)


@pytest.mark.parametrize(
    ("reset", "last_moment", "next_period"),
    [
        ("weekly", at(2025, 3, 16, 23, 59, 59), at(2025, 3, 17)),  # Sunday night, Monday
        ("monthly", at(2025, 1, 31, 23, 59, 59), at(2025, 2, 1)),
        ("monthly", at(2024, 12, 31, 23, 59, 59), at(2025, 1, 1)),
    ],
)
def test_credit_periods_turn_at_their_utc_boundary(
    reset: str, last_moment: float, next_period: float
) -> None:
    async def main() -> None:
        clock = Clock(last_moment)
        lim, ledger = limiter(clock, Ledger(total=2.0))
        p = principal(credit_limit=2.0, reset=reset)
        with pytest.raises(CreditExhausted):
            await lim.admit(p, "a", 0)
        ledger.total = 0.0  # what the ledger holds for the new period
        clock.now = next_period
        await lim.admit(p, "b", 0)
        assert ledger.calls[-1] == ("key:k1", next_period)

    run(main)


@pytest.mark.parametrize(
    ("reset", "now", "start", "end"),
    [
        ("daily", at(2025, 3, 12, 0, 0, 0), at(2025, 3, 12), at(2025, 3, 13)),
        ("daily", at(2025, 3, 12, 23, 59, 59) + 0.5, at(2025, 3, 12), at(2025, 3, 13)),
        ("weekly", at(2025, 3, 16, 23, 59, 59), at(2025, 3, 10), at(2025, 3, 17)),  # Sunday
        ("weekly", at(2025, 3, 17, 0, 0, 0), at(2025, 3, 17), at(2025, 3, 24)),  # Monday
        ("weekly", at(2025, 1, 1, 12, 0, 0), at(2024, 12, 30), at(2025, 1, 6)),  # across a year
        ("monthly", at(2024, 2, 29, 23, 59, 59), at(2024, 2, 1), at(2024, 3, 1)),
        ("monthly", at(2024, 12, 31, 23, 59, 59), at(2024, 12, 1), at(2025, 1, 1)),
        (None, at(2025, 3, 12), 0, None),
    ],
)
def test_credit_period_bounds(reset: str | None, now: float, start: float, end: float | None) -> None:
    assert credit_period(reset, now) == (start, end)  # type: ignore[arg-type]


def test_the_credit_counter_starts_from_the_ledger_once() -> None:
    async def main() -> None:
        clock = Clock()
        lim, ledger = limiter(clock, Ledger(total=5.0))
        spent_all = principal("key:all", credit_limit=5.0)  # no reset: all time
        with pytest.raises(CreditExhausted) as refused:
            await lim.admit(spent_all, "a", 0)
        assert refused.value.message == "Credit limit of 5 reached (spent 5)."
        assert ledger.calls == [("key:all", 0)]
        ledger.total = 4.0
        p = principal("key:some", credit_limit=5.0, reset="monthly")
        a = await lim.admit(p, "a", 0)
        await lim.admit(p, "b", 0)
        assert ledger.calls[1:] == [("key:some", at(2025, 3, 1))]  # once, not per request
        await lim.settle(a, 0, 1.0)
        assert (await lim.status(p)).credit_spent == pytest.approx(5.0)
        with pytest.raises(CreditExhausted):
            await lim.admit(p, "c", 0)

    run(main)


def test_idle_principals_are_forgotten_and_their_credit_comes_from_the_ledger() -> None:
    async def main() -> None:
        clock = Clock()
        lim, ledger = limiter(clock, Ledger(total=1.0))
        for i in range(1000):  # many short-lived JWT subjects
            a = await lim.admit(principal(f"jwt:idp user-{i}", rpm=10), f"r{i}", 0)
            await lim.settle(a, 0, 0.0)
        paying = principal("key:paying", credit_limit=3.0)
        await lim.settle(await lim.admit(paying, "p", 0), 0, 1.5)  # spent 1.0 + 1.5
        assert len(lim._accounts) == 1001
        clock.now += 61
        ledger.total = 2.5  # what the ledger now holds for it
        busy = principal("key:busy", max_concurrent=1)
        running = await lim.admit(busy, "b", 0)
        assert set(lim._accounts) == {"key:busy"}  # the idle ones are gone
        clock.now += 61
        await lim.admit(paying, "q", 0)
        assert "key:busy" in lim._accounts  # its request still runs
        assert ledger.calls[-1] == ("key:paying", 0)  # started again from the ledger
        assert (await lim.status(paying)).credit_spent == pytest.approx(2.5)
        await lim.settle(running, 0, 0.0)

    run(main)


def test_a_failing_ledger_fails_credits_closed_or_open_as_configured() -> None:
    async def main() -> None:
        p = principal(credit_limit=1.0, rpm=1)
        closed, ledger = limiter(Clock())
        ledger.fail = True
        with pytest.raises(ServiceUnavailable) as refused:
            await closed.admit(p, "a", 0)
        assert refused.value.message.startswith("Cannot check credits")
        opened, ledger = limiter(Clock(), credits_fail_open=True)
        ledger.fail = True
        await opened.admit(p, "a", 0)
        with pytest.raises(RateLimited):  # the rate limits are still checked
            await opened.admit(p, "b", 0)

    run(main)


def test_success_headers() -> None:
    async def main() -> None:
        clock = Clock()
        lim, _ = limiter(clock)
        both = principal("key:both", rpm=10, tpm=1000)
        await lim.admit(both, "a", 100)
        clock.now += 12
        admission = await lim.admit(both, "b", 300)
        assert admission.headers == [
            (b"x-ratelimit-limit", b"10"),
            (b"x-ratelimit-remaining", b"8"),
            (b"x-ratelimit-reset", b"48"),  # the first request leaves in 47.75 s
            (b"x-ratelimit-limit-requests", b"10"),
            (b"x-ratelimit-remaining-requests", b"8"),
            (b"x-ratelimit-limit-tokens", b"1000"),
            (b"x-ratelimit-remaining-tokens", b"600"),
        ]
        tokens_only = await lim.admit(principal("key:tokens", tpm=50), "c", 20)
        assert tokens_only.headers == [
            (b"x-ratelimit-limit", b"50"),
            (b"x-ratelimit-remaining", b"30"),
            (b"x-ratelimit-reset", b"60"),
            (b"x-ratelimit-limit-tokens", b"50"),
            (b"x-ratelimit-remaining-tokens", b"30"),
        ]
        slots_only = await lim.admit(principal("key:slots", max_concurrent=3), "d", 20)
        assert slots_only.headers == [] and slots_only.counted

    run(main)


def test_an_unlimited_principal_is_not_counted() -> None:
    async def main() -> None:
        lim, ledger = limiter(Clock())
        p = principal()
        admission = await lim.admit(p, "a", 10**9)
        assert admission.headers == [] and not admission.counted
        await lim.settle(admission, 10**9, 3.5)
        status = await lim.status(p)
        assert (status.requests, status.tokens, status.concurrent, status.credit_spent) == (
            None,
            None,
            None,
            None,
        )
        assert ledger.calls == []

    run(main)


def test_settle_logs_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        lim, _ = limiter(Clock())
        p = principal(tpm=100, max_concurrent=1, credit_limit=1.0)
        admission = await lim.admit(p, "a", 10)
        admission.bucket = "not a second"  # type: ignore[assignment]
        with caplog.at_level(logging.WARNING, logger="llmrouter.limits"):
            await lim.settle(admission, 20, 0.1)
        assert [r.getMessage() for r in caplog.records] == ["cannot settle request a"]

    run(main)


def test_create_limiter_picks_redis_only_when_configured() -> None:
    async def main() -> None:
        local = create_limiter(AccountSettings(), Ledger())
        assert isinstance(local, LocalLimiter)
        shared = create_limiter(AccountSettings(redis_url="redis://127.0.0.1:1/0"), Ledger())
        assert isinstance(shared, RedisLimiter)  # no connection until it is used
        await shared.aclose()

    run(main)


async def credit_hold_story(lim: Limiter, p: Principal, clock: Clock) -> None:
    """Requests in flight hold their estimated cost: the spend and the holds together are
    checked, a settled request's hold becomes its real cost, and a hold left by a crashed
    replica ends with the lease."""
    a = await lim.admit(p, "a", 0, 0.6)
    b = await lim.admit(p, "b", 0, 0.6)  # nothing spent, 0.6 held: under 1
    with pytest.raises(RateLimited) as held:
        await lim.admit(p, "c", 0, 0.6)  # 1.2 held, nothing spent: a 429 to retry, not a 402
    assert held.value.code == "credit_held" and held.value.retry_after == 1.0
    assert held.value.message == (
        "Credit limit of 1 is held by requests in flight (spent 0, 1.2 held); retry when one of "
        "them has finished."
    )
    await lim.settle(a, 0, 0.1)  # spent 0.1, 0.6 held
    d = await lim.admit(p, "d", 0, 0.6)
    await lim.settle(b, 0, 0.1)
    await lim.settle(d, 0, 0.1)
    assert (await lim.status(p)).credit_spent == pytest.approx(0.3)
    await lim.admit(p, "e", 0, 5.0)  # its own estimate never refuses it; then it crashes
    with pytest.raises(RateLimited):
        await lim.admit(p, "f", 0, 0.0)
    clock.now += LEASE_SECONDS + 1
    g = await lim.admit(p, "g", 0, 0.0)  # the hold ended with the lease
    await lim.settle(g, 0, 0.8)  # spent 1.1: really spent now
    with pytest.raises(CreditExhausted):
        await lim.admit(p, "h", 0, 0.0)


def test_credit_held_by_requests_in_flight() -> None:
    async def main() -> None:
        clock = Clock()
        lim, _ = limiter(clock)
        await credit_hold_story(lim, principal(credit_limit=1.0), clock)

    run(main)
