"""The dashboard's reads. Charts and tables read only the hourly rollup (`usage_hourly`, kept by
the ledger's trigger), so no page scans the ledger; the request log reads the ledger a page at a
time, newest first, by keyset on (created_at, request_id) with a LIMIT: never a count, never an
unbounded query.

Percentiles come from the rollup's bucket counts, interpolated within the bucket as Prometheus's
`histogram_quantile` does: exact to the bucket, and mergeable across hours and servers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from llmrouter.accounts.store import ROLLUP_BOUNDS_MS, Database

__all__ = [
    "GROUP_COLUMNS",
    "PAGE",
    "RANGES",
    "Cursor",
    "Deployment",
    "KeyUsage",
    "LogFilter",
    "LogPage",
    "LogRow",
    "Point",
    "Summary",
    "deployments",
    "log_page",
    "outcomes",
    "quantile",
    "series",
    "since_hour",
    "summary",
    "top_keys",
]

# The ranges a page shows (kept in the URL), and each one's step on the charts' time axis.
RANGES: dict[str, tuple[int, int]] = {
    "1h": (3600, 3600),
    "24h": (86400, 3600),
    "7d": (7 * 86400, 6 * 3600),
    "30d": (30 * 86400, 86400),
}
PAGE = 50  # records on a page of the request log
Grouping = Literal["key", "model", "provider"]
GROUP_COLUMNS: dict[Grouping, str] = {"key": "principal", "model": "model", "provider": "provider"}
Ranking = Literal["cost", "tokens", "requests"]
_RANKINGS: dict[Ranking, str] = {
    "cost": "cost",
    "tokens": "prompt_tokens + completion_tokens",
    "requests": "requests",
}
_BUCKETS = len(ROLLUP_BOUNDS_MS) + 1
_LATENCY = ", ".join(f"sum(latency_b{i})" for i in range(_BUCKETS))
_TTFT = ", ".join(f"sum(ttft_b{i})" for i in range(_BUCKETS))


def since_hour(range_seconds: int, now: float | None = None) -> int:
    """The first rollup hour a range covers: the one its start falls in (so `1h` shows the
    last hour or two, the rollup's resolution)."""
    start = (time.time() if now is None else now) - range_seconds
    return int(start // 3600) * 3600


def quantile(
    q: float, counts: Sequence[int], bounds: Sequence[float] = ROLLUP_BOUNDS_MS
) -> float | None:
    """The q-quantile of values counted in buckets with these upper bounds (and one above the
    last): linear within the bucket the rank falls in, the last bound for the open bucket, None
    when nothing was counted."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            return lower + (float(bounds[i]) - lower) * (rank - below) / count
        below += count
    return float(bounds[-1])


def _ints(values: Sequence[Any]) -> list[int]:
    return [int(v or 0) for v in values]


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    errors: int
    fallbacks: int
    cost: float
    prompt_tokens: int
    completion_tokens: int
    latency: list[int]  # bucket counts
    ttft: list[int]

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def latency_ms(self, q: float) -> float | None:
        return quantile(q, self.latency)

    def ttft_ms(self, q: float) -> float | None:
        return quantile(q, self.ttft)


async def summary(db: Database, since: int, principal: str | None = None) -> Summary:
    where, args = _where(since, principal)
    row = await db.fetchone(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(errors), 0), coalesce(sum(fallbacks), 0), "  # noqa: S608
        "coalesce(sum(cost), 0), coalesce(sum(prompt_tokens), 0), "
        f"coalesce(sum(completion_tokens), 0), {_LATENCY}, {_TTFT} FROM usage_hourly{where}",
        *args,
    )
    assert row is not None  # an aggregate always has its row
    return Summary(
        requests=int(row[0]),
        errors=int(row[1]),
        fallbacks=int(row[2]),
        cost=float(row[3]),
        prompt_tokens=int(row[4]),
        completion_tokens=int(row[5]),
        latency=_ints(row[6 : 6 + _BUCKETS]),
        ttft=_ints(row[6 + _BUCKETS :]),
    )


def _where(since: int, principal: str | None) -> tuple[str, list[Any]]:
    if principal is None:
        return " WHERE hour >= ?", [since]
    return " WHERE hour >= ? AND principal = ?", [since, principal]


@dataclass(frozen=True, slots=True)
class Point:
    """One step of the time axis for one group."""

    at: int  # unix seconds, the step's start
    group: str | None  # None: every group but the top ones, summed
    requests: int
    errors: int
    cost: float
    tokens: int


async def series(
    db: Database,
    since: int,
    step: int,
    by: Grouping | None = None,
    principal: str | None = None,
    *,
    top: int = 8,
    rank: Ranking = "cost",
) -> list[Point]:
    """Sums per step of the time axis, oldest first; if `by`, per group: the `top` groups with
    the most `rank` over the range each, and all the others as one (group None). The database
    picks and folds them, so a step has at most top + 1 rows however many keys or models the
    rollup holds."""
    where, args = _where(since, principal)
    figures = (
        "sum(requests), sum(errors), sum(cost), sum(prompt_tokens + completion_tokens) "
        f"FROM usage_hourly{where}"
    )
    if by is None:
        rows = await db.fetchall(
            f"SELECT (hour / ?) * ? AS at, '' AS g, {figures} GROUP BY at ORDER BY at",
            step,
            step,
            *args,
        )
    else:
        column = GROUP_COLUMNS[by]
        rows = await db.fetchall(
            f"WITH top_groups AS (SELECT {column} AS named FROM usage_hourly{where} "  # noqa: S608
            f"GROUP BY {column} ORDER BY sum({_RANKINGS[rank]}) DESC, {column} LIMIT ?) "
            f"SELECT (hour / ?) * ? AS at, CASE WHEN {column} IN (SELECT named FROM top_groups) "
            f"THEN {column} END AS g, {figures} GROUP BY at, g ORDER BY at, g",
            *args,
            top,
            step,
            step,
            *args,
        )
    return [
        Point(
            int(r[0]), None if r[1] is None else str(r[1]), int(r[2]), int(r[3]), float(r[4]), int(r[5])
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Deployment:
    """The rollup's figures for one model on one provider."""

    model: str
    provider: str
    requests: int
    errors: int
    fallbacks: int
    latency: list[int]
    ttft: list[int]

    def latency_ms(self, q: float) -> float | None:
        return quantile(q, self.latency)

    def ttft_ms(self, q: float) -> float | None:
        return quantile(q, self.ttft)


async def deployments(db: Database, since: int) -> list[Deployment]:
    rows = await db.fetchall(
        "SELECT model, provider, sum(requests), sum(errors), sum(fallbacks), "  # noqa: S608
        f"{_LATENCY}, {_TTFT} FROM usage_hourly WHERE hour >= ? "
        "GROUP BY model, provider ORDER BY sum(requests) DESC, model, provider LIMIT 500",
        since,
    )
    return [
        Deployment(
            str(r[0]),
            str(r[1]),
            int(r[2]),
            int(r[3]),
            int(r[4]),
            _ints(r[5 : 5 + _BUCKETS]),
            _ints(r[5 + _BUCKETS :]),
        )
        for r in rows
    ]


async def outcomes(db: Database, since: int) -> list[tuple[str, int]]:
    """The failed records' error codes, most frequent first."""
    rows = await db.fetchall(
        "SELECT outcome, sum(requests) FROM usage_hourly WHERE hour >= ? AND outcome <> '' "
        "GROUP BY outcome ORDER BY sum(requests) DESC, outcome LIMIT 100",
        since,
    )
    return [(str(r[0]), int(r[1])) for r in rows]


@dataclass(frozen=True, slots=True)
class KeyUsage:
    principal: str
    requests: int
    errors: int
    tokens: int
    cost: float


async def top_keys(db: Database, since: int, limit: int = 20) -> list[KeyUsage]:
    rows = await db.fetchall(
        "SELECT principal, sum(requests), sum(errors), sum(prompt_tokens + completion_tokens), "
        "sum(cost) FROM usage_hourly WHERE hour >= ? GROUP BY principal "
        "ORDER BY sum(cost) DESC, sum(requests) DESC, principal LIMIT ?",
        since,
        limit,
    )
    return [KeyUsage(str(r[0]), int(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows]


# -- the request log ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of the log ended: its last record's time and id."""

    created_at: float
    request_id: str

    def encode(self) -> str:
        return f"{self.created_at!r}~{self.request_id}"

    @classmethod
    def decode(cls, text: str) -> Cursor | None:
        at, sep, request_id = text.partition("~")
        try:
            created_at = float(at)
        except ValueError:
            return None
        if not sep or not request_id or not math.isfinite(created_at) or len(request_id) > 256:
            return None
        return cls(created_at, request_id)


@dataclass(frozen=True, slots=True)
class LogFilter:
    since: float
    principal: str | None = None
    model: str | None = None
    provider: str | None = None
    status: str | None = None  # "ok", "failed", or an HTTP status


@dataclass(frozen=True, slots=True)
class LogRow:
    request_id: str
    created_at: float
    principal: str
    model: str
    provider: str | None
    status: int
    error: str | None
    latency_ms: float
    ttft_ms: float | None
    tokens: int
    cost: float
    attempts: int

    @property
    def failed(self) -> bool:
        return self.status >= 400 or self.error is not None


@dataclass(frozen=True, slots=True)
class LogPage:
    rows: list[LogRow]
    next: Cursor | None  # the cursor of the next (older) page, if there is one


async def log_page(
    db: Database, where: LogFilter, after: Cursor | None = None, limit: int = PAGE
) -> LogPage:
    """One page of the log, newest first, older than `after`; one row more than a page is read
    to know whether another page follows."""
    conditions = ["created_at >= ?"]
    args: list[Any] = [where.since]
    if where.principal is not None:
        conditions.append("principal = ?")
        args.append(where.principal)
    if where.model is not None:
        conditions.append("coalesce(model, model_requested) = ?")
        args.append(where.model)
    if where.provider is not None:
        conditions.append("provider = ?")
        args.append(where.provider)
    if where.status == "ok":
        conditions.append("status < 400 AND error IS NULL")
    elif where.status == "failed":
        conditions.append("(status >= 400 OR error IS NOT NULL)")
    elif where.status is not None:
        conditions.append("status = ?")
        args.append(int(where.status))
    if after is not None:
        conditions.append("(created_at < ? OR (created_at = ? AND request_id < ?))")
        args += [after.created_at, after.created_at, after.request_id]
    rows = await db.fetchall(
        "SELECT request_id, created_at, principal, coalesce(model, model_requested), provider, "  # noqa: S608
        "status, error, latency_ms, ttft_ms, prompt_tokens + completion_tokens, cost, attempts "
        f"FROM ledger WHERE {' AND '.join(conditions)} "
        "ORDER BY created_at DESC, request_id DESC LIMIT ?",
        *args,
        limit + 1,
    )
    page = [
        LogRow(
            request_id=str(r[0]),
            created_at=float(r[1]),
            principal=str(r[2]),
            model=str(r[3]),
            provider=None if r[4] is None else str(r[4]),
            status=int(r[5]),
            error=None if r[6] is None else str(r[6]),
            latency_ms=float(r[7]),
            ttft_ms=None if r[8] is None else float(r[8]),
            tokens=int(r[9]),
            cost=float(r[10]),
            attempts=len(msgspec.json.decode(r[11])),
        )
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return LogPage(page, Cursor(page[-1].created_at, page[-1].request_id) if more else None)
