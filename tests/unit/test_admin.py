"""The dashboard's pure parts: path normalisation and the prefix test, the cross-site test, the
login rate limit, the CSV's formula guard, percentiles from bucket counts, the log's cursor, and
the SVG charts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from llmrouter.accounts.store import ROLLUP_BOUNDS_MS
from llmrouter.admin.charts import bars
from llmrouter.admin.pages import _cell
from llmrouter.admin.queries import Cursor, quantile
from llmrouter.admin.security import LoginLimiter, client_group, cross_site, normalise, under


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/admin", "/admin"),
        ("/admin/", "/admin"),
        ("//admin//keys", "/admin/keys"),
        ("/admin/./keys", "/admin/keys"),
        ("/x/../admin/keys", "/admin/keys"),
        ("/../../admin", "/admin"),  # never above the root
        ("/admin/keys/..", "/admin"),
        ("/admin/..", "/"),
        ("/adminx/keys", "/adminx/keys"),
        ("/ADMIN/keys", "/ADMIN/keys"),
        ("", "/"),
    ],
)
def test_normalise(path: str, normal: str) -> None:
    assert normalise(path) == normal


def test_under_the_prefix_only_whole_segments_and_case_sensitively() -> None:
    assert under("/admin", "/admin") and under("/admin/keys", "/admin")
    assert not under("/adminx", "/admin") and not under("/ADMIN/keys", "/admin")
    assert under(normalise("//admin/keys"), "/admin")
    assert under("/ops/admin/x", "/ops/admin") and not under("/ops", "/ops/admin")


def test_cross_site() -> None:
    host = {b"host": b"127.0.0.1:8000"}
    assert not cross_site(host, "http")  # no Origin: not a browser's cross-site form
    assert not cross_site({**host, b"origin": b"http://127.0.0.1:8000"}, "http")
    assert cross_site({**host, b"origin": b"http://127.0.0.1:9000"}, "http")  # another port
    assert cross_site({**host, b"origin": b"https://127.0.0.1:8000"}, "http")
    assert cross_site({**host, b"origin": b"null"}, "http")
    # Where the browser says where the request started, that decides.
    assert cross_site({**host, b"sec-fetch-site": b"cross-site"}, "http")
    assert cross_site({**host, b"sec-fetch-site": b"same-site"}, "http")  # another port
    for site in (b"same-origin", b"none"):
        assert not cross_site({**host, b"sec-fetch-site": site, b"origin": b"null"}, "http")


def test_login_limiter_counts_failures_per_address_and_in_all() -> None:
    limiter = LoginLimiter(2, in_all=3)
    assert limiter.allow("a", 0.0) and not limiter.failed("a", 0.0)
    assert limiter.allow("a", 1.0) and not limiter.failed("a", 1.0)
    assert not limiter.allow("a", 2.0)  # the address's two failures
    assert limiter.allow("b", 2.0)
    assert limiter.failed("b", 2.0)  # the third failure in all: over the limit in all
    assert limiter.allow("a", 60.5)  # a minute after the first, it has room again
    limiter.failed("a", 60.5)
    assert not limiter.allow("a", 60.6)  # ...for one failure: the second is still in the minute


def test_login_limiter_lets_a_right_key_in_whatever_others_failed() -> None:
    """An attacker failing from many addresses fills the limit in all; an address of its own
    (the admin's) may still try, since only failures are counted and a right key is none."""
    limiter = LoginLimiter(3, in_all=30)
    over = [limiter.failed(f"127.0.0.{i}", 1.0) for i in range(2, 12) for _ in range(3)]
    assert over[-1]  # thirty failures in all
    assert limiter.allow("127.0.0.99", 2.0)
    # Tries that succeed count nothing, however many.
    for _ in range(100):
        assert limiter.allow("127.0.0.100", 3.0)


def test_login_limiter_keeps_nothing_for_a_refused_attempt() -> None:
    limiter = LoginLimiter(1, in_all=1)
    limiter.failed("10.0.0.1", 0.0)
    for i in range(1000):
        limiter.allow(f"2001:db8:{i:x}::1", 1.0)  # allowed or not, asking keeps nothing
    assert not limiter.allow("10.0.0.1", 1.0)
    assert len(limiter) == 1


def test_login_limiter_forgets_quiet_addresses_and_holds_at_most_its_cap() -> None:
    limiter = LoginLimiter(1, addresses=100)
    flood = [f"10.0.{i // 256}.{i % 256}" for i in range(10_000)]  # ever new addresses
    for i, address in enumerate(flood):
        limiter.failed(address, 1.0 + i * 1e-4)
        assert len(limiter) <= 100
    # The most recent are kept, the least recent forgotten first.
    assert not limiter.allow(flood[-1], 2.0) and not limiter.allow(flood[-100], 2.0)
    assert limiter.allow(flood[-101], 2.0) and limiter.allow(flood[0], 2.0)
    limiter = LoginLimiter(1, addresses=100)
    limiter.failed("10.0.0.1", 0.0)
    limiter.failed("10.0.0.2", 50.0)
    limiter.failed("10.0.0.3", 70.0)  # a minute after the first: it is forgotten
    assert len(limiter) == 2
    assert limiter.allow("10.0.0.1", 70.0) and not limiter.allow("10.0.0.2", 70.0)


def test_login_limiter_counts_an_ipv6_64_as_one_address() -> None:
    limiter = LoginLimiter(3)
    for i in range(3):
        limiter.failed(f"2001:db8:1:2::{i + 1:x}", 0.0)
    assert not limiter.allow("2001:db8:1:2:ffff:ffff:ffff:ffff", 1.0)  # the same /64
    assert limiter.allow("2001:db8:1:3::1", 1.0)  # the next one
    assert len(limiter) == 1
    assert client_group("2001:db8:1:2:abcd::1") == "2001:db8:1:2::/64"
    assert client_group("::ffff:192.0.2.7") == "192.0.2.7"  # an IPv4 client on a v6 socket
    assert client_group("192.0.2.7") == "192.0.2.7"
    assert client_group("") == ""  # (no address: a unix socket)


def test_csv_cells_never_start_a_formula() -> None:
    for text in ("=1+1", "+1", "-1", "@SUM(A1)", " =1", "\n=1", "\t=1", "\t1", "\r1", "  @x"):
        assert _cell(text) == "'" + text, repr(text)
    for text in ("fake/ok", "a=1", "(unknown model)", "", "key:abc", "1-2"):
        assert _cell(text) == text


def test_quantile_interpolates_within_the_bucket() -> None:
    counts = [0] * (len(ROLLUP_BOUNDS_MS) + 1)
    assert quantile(0.5, counts) is None
    counts[0] = 10  # ten values at most 25 ms
    assert quantile(0.5, counts) == pytest.approx(12.5)
    counts[3] = 10  # ten in (100, 250]
    assert quantile(0.5, counts) == pytest.approx(25.0)
    assert quantile(0.75, counts) == pytest.approx(100 + 150 * 0.5)
    assert quantile(1.0, counts) == pytest.approx(250.0)
    counts[-1] = 100  # most above the last bound: the last bound, as Prometheus says
    assert quantile(0.95, counts) == ROLLUP_BOUNDS_MS[-1]


def test_cursor_round_trip_and_refusals() -> None:
    cursor = Cursor(1_800_000_000.123456789, "cmpl-abc~def")
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in ("", "nan~x", "inf~x", "12", "12~", "x~y"):
        assert Cursor.decode(bad) is None, bad


def test_chart_escapes_labels_and_draws_numbers() -> None:
    svg = str(
        bars("Spend <b>", ["<script>alert(1)</script>", "b"], [("m&<x>", [1.5, 3.0]), ("n", [0, 2])])
    )
    ET.fromstring(svg)  # noqa: S314 - our own output: well-formed, nothing unescaped broke it
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "m&amp;&lt;x&gt;" in svg
    titles = re.findall(r"<rect [^>]*><title>([^<]*)</title>", svg)
    assert len(titles) == 3 and titles[1].endswith("m&amp;&lt;x&gt;: 3")
    assert ">5<" in svg  # the largest total on the axis


def test_chart_of_nothing_says_so() -> None:
    for steps, series in (([], []), (["a", "b"], [("x", [0.0, 0.0])])):
        svg = str(bars("Nothing", steps, series))
        ET.fromstring(svg)  # noqa: S314 - our own output
        assert "No data in this range" in svg and "<rect" not in svg
