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
    for path in ("/admin/keys", "/admin/keys/abc/revoke"):
        r = httpx.post(router.base + path, data={"name": "x"})
        assert r.status_code == 403, path
        headers_ok(r.headers)
    # Logging out with no live session: its cookie is cleared, and the login form follows.
    r = httpx.post(router.base + "/admin/logout", data={})
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert "Max-Age=0" in r.headers["set-cookie"]
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


def test_secure_cookie_behind_a_tls_proxy(tmp_path: Path, fake_upstream: str) -> None:
    """`secure_cookie: true` (TLS ends at a proxy): the cookie is Secure over plain HTTP, and
    this origin is the https one of the Host."""
    text = dashboard_config(fake_upstream) + "  secure_cookie: true\n"
    with serving(tmp_path, text) as router:
        key = admin_key(router)
        r = httpx.post(router.base + "/admin/login", data={"key": key})
        assert r.status_code == 303
        flags = [f.strip() for f in r.headers["set-cookie"].split(";")]
        assert "Secure" in flags and "HttpOnly" in flags
        # (httpx keeps a Secure cookie from plain HTTP: it is sent by hand here.)
        session = r.headers["set-cookie"].split(";", 1)[0]
        host = router.base.removeprefix("http://")
        cookie = {"Cookie": session}
        page = httpx.get(router.base + "/admin/keys", headers=cookie)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert page.status_code == 200 and token
        form = {"csrf": token.group(1), "name": "via-proxy"}
        made = httpx.post(
            router.base + "/admin/keys", data=form, headers={**cookie, "Origin": f"https://{host}"}
        )
        assert made.status_code == 200 and "via-proxy" in made.text
        for origin in ("http://other", f"http://{host}"):  # the plain origin is not this one
            r = httpx.post(
                router.base + "/admin/keys",
                data={**form, "name": "refused"},
                headers={**cookie, "Origin": origin},
            )
            assert r.status_code == 403, origin
        r = httpx.post(
            router.base + "/admin/login", data={"key": key}, headers={"Origin": f"https://{host}"}
        )
        assert r.status_code == 303
        r = httpx.post(
            router.base + "/admin/login", data={"key": key}, headers={"Origin": "http://other"}
        )
        assert r.status_code == 403
        assert "refused" not in httpx.get(router.base + "/admin/keys", headers=cookie).text


def test_logout_after_the_session_expired_clears_the_cookie(router: Router, admin: str) -> None:
    client = login(router, admin)
    token = csrf(client)
    with sqlite3.connect(db_path(router)) as db:
        db.execute("UPDATE admin_sessions SET expires_at = ?", (int(time.time()) - 1,))
    r = client.post("/admin/logout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert "Max-Age=0" in r.headers["set-cookie"] and "llmrouter_session=;" in r.headers["set-cookie"]


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


def login_from(router: Router, key: str, source: str) -> int:
    """A login sent from this loopback address (127.0.0.0/8 is all the machine's)."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, base_url=router.base) as client:
        return client.post("/admin/login", data={"key": key}).status_code


def test_login_attempts_are_rate_limited(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, dashboard_config(fake_upstream, logins_per_minute=3)) as router:
        key = admin_key(router)
        # A right key counts nothing against its address.
        assert [login_from(router, key, "127.0.0.1") for _ in range(5)] == [303] * 5
        statuses = [
            httpx.post(router.base + "/admin/login", data={"key": f"lr-wrong{i}"}).status_code
            for i in range(3)
        ]
        assert statuses == [401, 401, 401]
        r = httpx.post(router.base + "/admin/login", data={"key": key})
        assert r.status_code == 429 and "set-cookie" not in r.headers
        assert r.headers["retry-after"] == "60"
        headers_ok(r.headers)
        # Others' failures from ten addresses, past the limit in all (thirty), keep no one else
        # out: the admin's right key from an address of its own gets in.
        wrong = [login_from(router, "lr-wrong", f"127.0.0.{i}") for i in range(2, 12) for _ in range(3)]
        # (the three above and 26 here are 401s; from the thirtieth in all they are refused)
        assert wrong == [401] * 26 + [429] * 4
        assert login_from(router, key, "127.0.0.99") == 303
        assert login_from(router, "lr-wrong", "127.0.0.98") == 429


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


# -- what a review found ----------------------------------------------------------------------------


def test_rotating_a_key_ends_its_sessions(router: Router, admin: str) -> None:
    """A leaked admin secret is locked out by a rotation: the sessions it opened end with it,
    whether the rotation came over the admin API or from the CLI."""
    auth = {"Authorization": f"Bearer {admin}"}
    for how in ("api", "cli"):
        key = admin_key(router, f"rotated-by-{how}")
        key_id = key[3:15]
        leaked = login(router, key)
        assert leaked.get("/admin/keys").status_code == 200
        bystander = login(router, admin)  # another key's session is not touched
        if how == "api":
            r = httpx.post(f"{router.api}/keys/{key_id}/rotate", headers=auth)
            assert r.status_code == 200, r.text
        else:
            router.cli("keys", "rotate", key_id)
        r = leaked.get("/admin/keys")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login", how
        assert bystander.get("/admin/keys").status_code == 200


def test_unknown_models_roll_up_as_one_group(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, dashboard_config(fake_upstream)) as router:
        for i in range(50):
            assert send(router, {"model": f"nosuch-{i}", "prompt": "x"}).status_code == 404
        client = login(router, admin_key(router))
        page = client.get("/admin/usage?by=model&range=1h").text
        assert "nosuch" not in page
        page = client.get("/admin/reliability?range=1h").text
        assert "nosuch" not in page
        assert page.count("<tr><td>(unknown model)</td>") == 1, page
        lines = client.get("/admin/usage.csv?by=model&range=24h").text.strip().splitlines()
        models = [line.split(",")[1] for line in lines[1:]]
        assert set(models) == {"(unknown model)"}
        assert sum(int(line.split(",")[2]) for line in lines[1:]) == 50
        with sqlite3.connect(db_path(router)) as db:
            assert db.execute("SELECT count(DISTINCT model) FROM usage_hourly").fetchone() == (1,)


@pytest.mark.parametrize(
    "target",
    [
        "/admin//%0d%0aSet-Cookie:%20llmrouter_session=evil",
        "/admin//%0aX-Injected:%201",
        "/admin//%00",
        "/admin//%ff",
        "/admin//%E2%80%A8",
        "/admin//%09x",
        "/admin//%2541",
        "/admin//%3Fa",
        "/admin//x?a=%0d%0ab&c=%ff",
    ],
)
def test_a_path_no_header_can_hold_is_escaped_again(router: Router, admin: str, target: str) -> None:
    status, headers, body = get_raw(router, target)
    assert status == 308, (target, status, body)
    location = headers["location"]
    assert location.startswith("/admin/") and location.isascii() and location.isprintable()
    assert " " not in location and "set-cookie" not in headers and "x-injected" not in headers
    headers_ok(headers)
    # The Location names the same path: followed, it is the normal form, served as such.
    cookie = "; ".join(f"{k}={v}" for k, v in login(router, admin).cookies.items())
    status, headers, body = get_raw(router, location, f"Cookie: {cookie}")
    assert status == 404 and b"No such page" in body, (location, status, body)
    headers_ok(headers)


def test_static_files_are_kept_an_hour(router: Router, admin: str) -> None:
    page = login(router, admin).get("/admin").text
    links = re.findall(r'href="(/admin/static/[^"]+)"', page)
    assert len(links) == 2 and all("?v=" in link for link in links), links
    for link in links:
        r = httpx.get(router.base + link)
        assert r.status_code == 200
        assert r.headers["cache-control"] == "public, max-age=3600"
        headers_ok(r.headers)


def test_the_keys_page_is_paged(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, dashboard_config(fake_upstream)) as router:
        client = login(router, admin_key(router))
        with sqlite3.connect(router.home / "llmrouter.sqlite3") as db:
            made = int(time.time())
            db.executemany(
                "INSERT INTO api_keys (id, name, secret_hash, created_at, policy) "
                "VALUES (?, ?, 'x', ?, '{}')",
                [(f"bulk{i:08d}", f"bulk-{i}", made + i // 7) for i in range(120)],
            )
        seen: list[str] = []
        url: str | None = "/admin/keys"
        pages = 0
        while url is not None:
            r = client.get(url)
            assert r.status_code == 200
            rows = re.findall(r"<td><code>([^<]+)</code></td>", r.text)
            assert len(rows) <= 50
            seen += rows
            pages += 1
            more = re.search(r'href="([^"]+)" id="more-keys"', r.text)
            url = more.group(1).replace("&amp;", "&") if more else None
        # Every key once, in the order made: the admin's, the router's own and 120 more.
        assert pages == 3 and len(seen) == len(set(seen)) == 122
        bulk = [k for k in seen if k.startswith("bulk")]
        assert bulk == sorted(bulk)
        assert client.get("/admin/keys?after=junk").status_code == 400


def test_a_key_made_on_the_dashboard_has_a_bounded_name(router: Router, admin: str) -> None:
    client = login(router, admin)
    token = csrf(client)
    for field, value in (("name", "n" * 60_000), ("owner", "o" * 257)):
        form = {"csrf": token, "name": "bounded", field: value}
        r = client.post("/admin/keys", data=form)
        assert r.status_code == 400 and "at most 256 characters" in r.text, field
    with sqlite3.connect(db_path(router)) as db:
        assert db.execute("SELECT max(length(name)) FROM api_keys").fetchone()[0] < 257
    r = client.post("/admin/keys", data={"csrf": token, "name": "n" * 256, "owner": "o" * 256})
    assert r.status_code == 200


def test_keys_of_one_name_stay_apart_on_the_charts(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, dashboard_config(fake_upstream)) as router:
        client = login(router, admin_key(router))
        secrets = []
        for n, name in enumerate(("twin", "other", "twin")):
            if n == 2:
                router.cli("keys", "revoke", "twin")  # the name is free again once revoked
            secrets.append(admin_key(router, name))
            for _ in range(n + 1):
                r = httpx.post(
                    f"{router.api}/completions",
                    headers={"Authorization": f"Bearer {secrets[-1]}"},
                    json={"model": "fake/ok", "prompt": "x"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
        page = client.get("/admin/usage?by=key&range=1h").text
        legend = re.findall(r'class="legend">([^<]*)<', page)
        ids = [s[3:15] for s in secrets]
        want = {f"twin ({ids[0]})", f"other ({ids[1]})", f"twin ({ids[2]})"}
        assert set(legend) == want, legend
        assert len(legend) == 6  # the same three on each chart, spend and tokens


def test_the_pages_follow_a_reloaded_config(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, dashboard_config(fake_upstream)) as router:
        admin = admin_key(router)
        client = login(router, admin)
        assert "fake/brand-new" not in client.get("/admin/reliability").text
        text = dashboard_config(fake_upstream).replace(
            "routing:",
            "  - {id: fake/brand-new, deployments: [{provider: fake, model: new-one}]}\nrouting:",
        )
        router.config.write_text(text)
        r = httpx.post(
            f"{router.api}/admin/reload", headers={"Authorization": f"Bearer {admin}"}, timeout=30
        )
        assert r.status_code == 200 and r.json()["data"]["models"]["added"] == ["fake/brand-new"]
        assert "fake/new-one" in client.get("/admin/reliability").text  # its deployment's health
        assert "fake/brand-new" in client.get("/admin/keys").text  # a model a new key may get
