"""The dashboard over HTTP, through a real router process: every page needs a session whatever
the path's spelling, the session cookie's flags, expiry, logout, the login rate limit, CSRF and
cross-site refusals, the security headers on every admin response, no secret in any page, and
the pages' figures from the traffic sent."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmrouter.admin.sessions import session_cookie
from tests.admin import admin_key, csrf, dashboard_config, get_raw, login, raw, send
from tests.conftest import UPSTREAM_KEYS, Router, serving

CSP = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
PAGES = [
    "/admin",
    "/admin?range=1h",
    "/admin?range=7d",
    "/admin?range=30d",
    "/admin/usage",
    "/admin/usage?by=key",
    "/admin/usage?by=provider&range=30d",
    "/admin/usage.csv?by=key",
    "/admin/reliability",
    "/admin/log",
    "/admin/log?status=failed",
    "/admin/keys",
]


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    tmp = tmp_path_factory.mktemp("dashboard")
    with serving(tmp, dashboard_config(fake_upstream)) as r:
        yield r


@pytest.fixture(scope="module")
def admin(router: Router) -> str:
    return admin_key(router)


@pytest.fixture(scope="module")
def traffic(router: Router) -> list[str]:
    """Requests of each kind, their ids: 4 answered, 2 failed, 1 that fell back, 1 stream."""
    ids = []
    for body in (
        {"model": "fake/ok", "prompt": "hello"},
        {"model": "fake/ok", "prompt": "hello again"},
        {"model": "fake/cheap", "prompt": "cheap"},
        {"model": "fake/say", "prompt": "say this", "max_tokens": 50},
        {"model": "fake/status-500", "prompt": "fails"},
        {"model": "fake/status-500", "prompt": "fails again"},
        {"model": "fake/fallback", "prompt": "falls back"},
        {"model": "fake/ok", "prompt": "streamed", "stream": True},
    ):
        r = send(router, body)
        ids.append(r.headers["x-request-id"])
    return ids


def headers_ok(headers: httpx.Headers | dict[str, str]) -> None:
    assert headers["content-security-policy"] == CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def db_path(router: Router) -> Path:
    return router.home / "llmrouter.sqlite3"


# -- authorisation ----------------------------------------------------------------------------------


def test_every_page_needs_a_session(router: Router) -> None:
    for path in [*PAGES, "/admin/log/cmpl-x", "/admin/keys/abc"]:
        r = httpx.get(router.base + path)
        assert r.status_code == 303 and r.headers["location"] == "/admin/login", path
        headers_ok(r.headers)
    for path in ("/admin/keys", "/admin/logout", "/admin/keys/abc/revoke"):
        r = httpx.post(router.base + path, data={"name": "x"})
        assert r.status_code == 403, path
        headers_ok(r.headers)


@pytest.mark.parametrize(
    "target",
    [
        "//admin/keys",
        "/admin//keys",
        "/admin/./keys",
        "/x/../admin/keys",
        "/admin/keys/",
        "/admin/%2e/keys",
    ],
)
def test_path_tricks_reach_no_page_without_a_session(router: Router, admin: str, target: str) -> None:
    status, headers, body = get_raw(router, target)
    assert status == 308 and headers["location"] == "/admin/keys", (target, status, body)
    assert b"<table" not in body
    headers_ok(headers)
    # ...and with a session the same trick still only redirects: the page is served at its
    # normal form alone, where the session is checked.
    client = login(router, admin)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    status, headers, body = get_raw(router, target, f"Cookie: {cookie}")
    assert status == 308 and b"<table" not in body
    # A state change at a non-normal path is refused outright.
    form = f"csrf={csrf(client)}&name=tricked"
    request = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Cookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(form)}\r\n\r\n{form}"
    )
    status, headers, _ = raw(router, request.encode())
    assert status == 404
    headers_ok(headers)
    assert "tricked" not in client.get("/admin/keys").text


def test_a_host_header_changes_nothing(router: Router) -> None:
    status, headers, _ = raw(
        router, b"GET /admin/keys HTTP/1.1\r\nHost: admin.internal\r\nConnection: close\r\n\r\n"
    )
    assert status == 303 and headers["location"] == "/admin/login"


def test_other_methods_are_refused(router: Router, admin: str) -> None:
    client = login(router, admin)
    for method in ("PUT", "DELETE", "PATCH"):
        r = client.request(method, "/admin/keys")
        assert r.status_code == 405, method
        headers_ok(r.headers)


def test_login_cookie_session_and_logout(router: Router, admin: str) -> None:
    r = httpx.post(router.base + "/admin/login", data={"key": admin})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    flags = [f.strip() for f in cookie.split(";")]
    assert "HttpOnly" in flags and "SameSite=Strict" in flags and "Path=/admin" in flags
    assert "Secure" not in flags  # plain HTTP here; over TLS it is set (test_secure_over_tls)
    session_id = cookie.split(";", 1)[0].split("=", 1)[1]
    assert admin not in cookie and len(session_id) >= 40
    # The store holds only the id's hash.
    with sqlite3.connect(db_path(router)) as db:
        hashes = [row[0] for row in db.execute("SELECT id_hash FROM admin_sessions")]
    assert hashlib.sha256(session_id.encode()).hexdigest() in hashes
    assert session_id not in hashes
    client = httpx.Client(base_url=router.base, cookies={"llmrouter_session": session_id})
    assert client.get("/admin").status_code == 200
    token = csrf(client)
    out = client.post("/admin/logout", data={"csrf": token})
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    # The old cookie no longer works: the session's row is gone.
    again = httpx.get(router.base + "/admin", cookies={"llmrouter_session": session_id})
    assert again.status_code == 303 and again.headers["location"] == "/admin/login"


def test_secure_over_tls() -> None:
    assert session_cookie("/admin", "v", 60, secure=True).endswith("; Secure")
    assert "Secure" not in session_cookie("/admin", "v", 60, secure=False)


def test_an_expired_session_logs_in_again(router: Router, admin: str) -> None:
    client = login(router, admin)
    assert client.get("/admin").status_code == 200
    with sqlite3.connect(db_path(router)) as db:
        db.execute("UPDATE admin_sessions SET expires_at = ?", (int(time.time()) - 1,))
    r = client.get("/admin")
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"


def test_a_revoked_or_plain_key_has_no_session(router: Router) -> None:
    # A key that is not an admin's cannot log in.
    r = httpx.post(router.base + "/admin/login", data={"key": router.key})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert "not an admin key" in r.text
    r = httpx.post(router.base + "/admin/login", data={"key": "lr-nonsense"})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    # A session ends when its key is revoked.
    key = admin_key(router, "short-lived-admin")
    client = login(router, key)
    assert client.get("/admin").status_code == 200
    key_id = key[3:15]
    router.cli("keys", "revoke", key_id)
    r = client.get("/admin")
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"


def test_login_attempts_are_rate_limited(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, dashboard_config(fake_upstream, logins_per_minute=3)) as router:
        key = admin_key(router)
        statuses = [
            httpx.post(router.base + "/admin/login", data={"key": f"lr-wrong{i}"}).status_code
            for i in range(3)
        ]
        assert statuses == [401, 401, 401]
        r = httpx.post(router.base + "/admin/login", data={"key": key})
        assert r.status_code == 429 and "set-cookie" not in r.headers
        assert r.headers["retry-after"] == "60"
        headers_ok(r.headers)


def test_forms_need_the_session_csrf_token_and_this_origin(router: Router, admin: str) -> None:
    client = login(router, admin)
    token = csrf(client)
    refused = [
        client.post("/admin/keys", data={"name": "no-token"}),
        client.post("/admin/keys", data={"name": "wrong-token", "csrf": token[:-1] + "x"}),
        client.post(
            "/admin/keys",
            data={"name": "other-origin", "csrf": token},
            headers={"Origin": "http://evil.example"},
        ),
        client.post(
            "/admin/keys",
            data={"name": "cross-site", "csrf": token},
            headers={"Sec-Fetch-Site": "cross-site"},
        ),
        client.post("/admin/logout", data={}),
    ]
    assert [r.status_code for r in refused] == [403] * 5
    for r in refused:
        headers_ok(r.headers)
    # Login too refuses a form from another origin.
    r = httpx.post(
        router.base + "/admin/login", data={"key": admin}, headers={"Origin": "http://evil.example"}
    )
    assert r.status_code == 403 and "set-cookie" not in r.headers
    names = client.get("/admin/keys").text
    assert not any(n in names for n in ("no-token", "wrong-token", "other-origin", "cross-site"))
    # The same form with its token, from this origin, does it.
    origin = router.base
    made = client.post("/admin/keys", data={"name": "made", "csrf": token}, headers={"Origin": origin})
    assert made.status_code == 200 and re.search(r"lr-[0-9A-Za-z]{12}_", made.text)
    assert client.get("/admin").status_code == 200  # the session survived it all


# -- headers and secrets --------------------------------------------------------------------------


def test_headers_on_every_admin_response(router: Router, admin: str, traffic: list[str]) -> None:
    client = login(router, admin)
    responses = [
        httpx.get(router.base + "/admin/login"),
        httpx.get(router.base + "/admin/static/dashboard.css"),
        client.get("/admin/static/nothing.css"),
        client.get("/admin/no-such-page"),
        client.get("/admin/log/cmpl-none"),
        client.get("/admin?range=2y"),
        *[client.get(p) for p in PAGES],
        client.get(f"/admin/log/{traffic[0]}"),
    ]
    for r in responses:
        headers_ok(r.headers)
    statuses = [r.status_code for r in responses]
    assert statuses[:6] == [200, 200, 404, 404, 404, 400]
    assert all(s == 200 for s in statuses[6:]), statuses
    assert responses[1].headers["content-type"].startswith("text/css")
    for r in responses[6:]:
        assert r.headers["cache-control"] == "no-store"


def test_no_secret_in_any_page(router: Router, admin: str, traffic: list[str]) -> None:
    client = login(router, admin)
    token = csrf(client)
    created = client.post("/admin/keys", data={"name": "secret-once", "csrf": token})
    secret = re.search(r"lr-[0-9A-Za-z]{12}_[0-9A-Za-z]{38}", created.text)
    assert secret, created.text
    key_id = secret.group(0)[3:15]
    pages = [*PAGES, f"/admin/keys/{key_id}", *[f"/admin/log/{i}" for i in traffic]]
    pages += [f"/admin/keys/{admin[3:15]}", f"/admin/keys/{router.key[3:15]}"]
    for path in pages:
        r = client.get(path)
        assert r.status_code == 200, path
        for leaked in (UPSTREAM_KEYS["fake"], admin, router.key, secret.group(0)):
            assert leaked not in r.text, (path, leaked[:8])
        assert "upstream-secret" not in r.text


# -- the pages' figures -----------------------------------------------------------------------------


def test_overview_counts_the_traffic(router: Router, admin: str, traffic: list[str]) -> None:
    client = login(router, admin)
    html = client.get("/admin?range=1h").text

    def tile(name: str) -> str:
        match = re.search(rf'id="{name}">.*?class="value">([^<]*)<', html, re.S)
        assert match, name
        return match.group(1)

    # Every request made so far through this router (this module's traffic, and no other).
    with sqlite3.connect(db_path(router)) as db:
        requests, failed, cost = db.execute(
            "SELECT count(*), sum(status >= 400 OR error IS NOT NULL), sum(cost) FROM ledger"
        ).fetchone()
    assert requests >= len(traffic)
    assert tile("requests") == f"{requests:,}"
    assert tile("error-rate") == f"{failed / requests * 100:.1f}%"
    assert tile("spend") == (f"{cost:,.2f}" if cost >= 1 else f"{cost:.4g}")
    assert "No data in this range" not in html
    assert html.count("<svg") == 2


def test_a_failed_request_shows_its_attempts(router: Router, admin: str, traffic: list[str]) -> None:
    client = login(router, admin)
    failed = client.get(f"/admin/log/{traffic[4]}").text
    assert "Failed: status 502" in failed or "Failed: status 500" in failed, failed
    attempts = re.findall(
        r"<tr class=\"failed\"><td>(\d)</td><td>([^<]*)</td><td><code>([^<]*)<", failed
    )
    # Tried twice (max_attempts: 2), each time the upstream's 500.
    assert attempts == [
        ("1", "fake/status-500", "upstream_unavailable"),
        ("2", "fake/status-500", "upstream_unavailable"),
    ], failed
    assert '<pre class="text" id="prompt">fails</pre>' in failed
    fell_back = client.get(f"/admin/log/{traffic[6]}").text
    rows = re.findall(r"<tr class=\"(ok|failed)\"><td>(\d)</td><td>([^<]*)</td>", fell_back)
    assert rows == [("failed", "1", "fake/status-503"), ("ok", "2", "fake/ok")], fell_back


def test_csv_export(router: Router, admin: str, traffic: list[str]) -> None:
    client = login(router, admin)
    r = client.get("/admin/usage.csv?by=model&range=24h")
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    lines = r.text.strip().splitlines()
    assert lines[0] == "start_utc,model,requests,errors,tokens,cost"
    models = {line.split(",")[1] for line in lines[1:]}
    assert {"fake/ok", "fake/cheap", "fake/status-500"} <= models


def test_reliability_shows_an_ejected_deployment(tmp_path: Path, fake_upstream: str) -> None:
    text = dashboard_config(fake_upstream).replace(
        "health: {consecutive_failures: 1000000, min_attempts: 1000000}",
        "health: {consecutive_failures: 1, cooldown_seconds: 600}",
    )
    with serving(tmp_path, text) as router:
        assert send(router, {"model": "fake/status-500", "prompt": "x"}).status_code >= 500
        page = login(router, admin_key(router)).get("/admin/reliability").text
        rows = re.findall(
            r"<tr><td>(fake/[^<]+)</td><td>[^<]*</td><td><span class=\"state state-(\w+)\">"
            r"[^<]*</span></td><td class=\"num\">(\d+)</td>",
            page,
        )
        assert ("fake/status-500", "ejected", "1") in rows
        assert ("fake/ok", "closed", "0") in rows
