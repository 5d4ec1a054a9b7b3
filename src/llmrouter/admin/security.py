"""What keeps the dashboard's pages to the admins who logged in: the one path test, the headers
every admin response carries, the cross-site refusal, and the login attempts' rate limit.

Authorisation is decided once, on the normalised path: `//admin/keys`, `/admin/./keys` and
`/x/../admin/keys` are all the dashboard's, so a path trick can never reach a page by a road the
session check does not stand on (the server answers a non-normal path with a redirect to its
normal form, which is then checked like any other).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque

__all__ = [
    "HEADERS",
    "LoginLimiter",
    "client_group",
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
_WINDOW = 60.0  # seconds a failed login is remembered


def normalise(path: str) -> str:
    """`path` with `//` collapsed and `.` and `..` resolved (never above the root), without a
    trailing slash. Percent-escapes were decoded by the server already."""
    if path[:1] == "/" and path[-1:] != "/" and "//" not in path and "/." not in path:
        return path  # normal already (every request's path is asked: the common case is quick)
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


def client_group(address: str) -> str:
    """The address a login's attempts are counted under: an IPv6 client's /64 (one subscriber's
    network; a host there can take any of its 2**64 addresses), an IPv4 one as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginLimiter:
    """Failed logins in the last minute, in this process: per client address (an IPv6 /64 as
    one), at most `per_minute`, after which that address is refused before its key is looked
    at; and in all, `in_all` (10 times as many), past which a wrong key is answered as refused
    too. Only failures count, so no one's wrong guesses keep a right key out: a right key from an
    address under its own limit always gets in. A refused attempt is not counted and leaves no
    state behind, and at most `addresses` addresses are remembered (the longest quiet forgotten
    first), so a flood from ever new addresses holds bounded memory."""

    def __init__(self, per_minute: int, *, in_all: int | None = None, addresses: int = 10_000) -> None:
        self._per_address = per_minute
        self._addresses = addresses
        # The newest failures only, as many as a limit needs: the limit is reached when the
        # oldest of them is still in the window.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # least recent first
        self._all: deque[float] = deque(maxlen=in_all if in_all is not None else per_minute * 10)

    def allow(self, address: str, now: float | None = None) -> bool:
        """May `address` try a key now? Counts nothing and keeps nothing."""
        now = time.monotonic() if now is None else now
        mine = self._failures.get(client_group(address))
        return not _full(mine, self._per_address, now)

    def failed(self, address: str, now: float | None = None) -> bool:
        """Count a wrong key from `address` now; True if the failures from all addresses are
        now over their limit."""
        now = time.monotonic() if now is None else now
        group = client_group(address)
        mine = self._failures.pop(group, None)
        if mine is None:
            mine = deque(maxlen=self._per_address)
        mine.append(now)
        self._failures[group] = mine  # the most recent now
        self._all.append(now)
        self._prune(now)
        return _full(self._all, self._all.maxlen or 0, now)

    def _prune(self, now: float) -> None:
        """Forget the addresses with no failure in the window (the least recent are first), and
        past the cap, the least recent whatever their age."""
        while self._failures:
            oldest = next(iter(self._failures.values()))
            if len(self._failures) <= self._addresses and oldest[-1] > now - _WINDOW:
                break
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        """How many addresses are remembered."""
        return len(self._failures)


def _full(window: deque[float] | None, limit: int, now: float) -> bool:
    return window is not None and len(window) >= limit and window[-limit] > now - _WINDOW
