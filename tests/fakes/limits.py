"""What the limiter tests inject: a clock they set, and the ledger's `spent` as a stub."""

from __future__ import annotations

from datetime import UTC, datetime


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


T0 = at(2025, 3, 12, 10, 0, 30) + 0.25  # mid-minute, a quarter into its second


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Ledger:
    """The ledger's `spent`: a total it answers, and who asked since when."""

    def __init__(self, total: float = 0.0) -> None:
        self.total = total
        self.calls: list[tuple[str, float]] = []
        self.fail = False

    async def __call__(self, principal_id: str, since: float) -> float:
        self.calls.append((principal_id, since))
        if self.fail:
            raise OSError("database is locked")
        return self.total
