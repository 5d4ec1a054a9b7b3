"""What keeps the dashboard's pages to the admins who logged in: the one path test, the headers
every admin response carries, the cross-site refusal, and the login attempts' rate limit.

Authorisation is decided once, on the normalised path: `//admin/keys`, `/admin/./keys` and
`/x/../admin/keys` are all the dashboard's, so a path trick can never reach a page by a road the
session check does not stand on (the server answers a non-normal path with a redirect to its
normal form, which is then checked like any other).
"""

from __future__ import annotations

import time
from collections import deque

__all__ = [
    "HEADERS",
    "LoginLimiter",
    "cross_site",
    "normalise",
    "under",
]

CSP = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


def normalise(path: str) -> str:
    """`path` with `//` collapsed and `.` and `..` resolved (never above the root), without a
    trailing slash. Percent-escapes were decoded by the server already."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def under(path: str, prefix: str) -> bool:
    """Is `path` (normalised) the dashboard's at `prefix`? Case-sensitive, like the routes."""
    return path == prefix or path.startswith(prefix + "/")


def cross_site(headers: dict[bytes, bytes], scheme: str) -> bool:
    """Does the request say it came from anywhere but this origin? Browsers say where a request
    started in `Sec-Fetch-Site`: only `same-origin` (or `none`, the user's own doing) passes;
    `same-site` is refused too, since another port of this host is the same site. A browser too
    old to send it is judged by `Origin` against the host the request was sent to; `Origin: null`
    (an opaque origin: what browsers send for a form's POST under `Referrer-Policy: no-referrer`
    when they send no Sec-Fetch-Site either) is refused. A client that sends neither is not a
    browser carrying a victim's cookie; the CSRF token still stands in its way."""
    site = headers.get(b"sec-fetch-site")
    if site is not None:
        return site.lower() not in (b"same-origin", b"none")
    origin = headers.get(b"origin")
    if origin is None:
        return False
    host = headers.get(b"host", b"")
    return origin.decode("latin-1").lower() != f"{scheme}://{host.decode('latin-1')}".lower()


class LoginLimiter:
    """Login attempts in the last minute, per client address and in all (`in_all` times as many),
    in this process: an attacker guessing keys gets `per_minute` tries a minute per address."""

    def __init__(self, per_minute: int, *, in_all: int | None = None) -> None:
        self._per_address = per_minute
        self._in_all = in_all if in_all is not None else per_minute * 10
        self._attempts: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def allow(self, address: str, now: float | None = None) -> bool:
        """Count an attempt from `address` now; False (and not counted) if it is over a limit."""
        now = time.monotonic() if now is None else now
        since = now - 60.0
        mine = self._attempts.setdefault(address, deque())
        for window in (mine, self._all):
            while window and window[0] <= since:
                window.popleft()
        if len(mine) >= self._per_address or len(self._all) >= self._in_all:
            return False
        mine.append(now)
        self._all.append(now)
        if len(self._attempts) > 10_000:  # forget the quiet addresses
            self._attempts = {a: w for a, w in self._attempts.items() if w and w[-1] > since}
        return True
