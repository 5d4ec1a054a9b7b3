"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright against a real
router process with traffic this test sent. Log in, read the overview's figures and charts, page
the request log, find a failed request and why it failed, see a prompt holding `<script>` stay
inert, create a key (its secret shown once), edit its limits, rotate and revoke it, and watch a
forged form from another origin be refused. A screenshot of each page goes to tests/artifacts/
(and, with LLMROUTER_DOCS_SCREENSHOTS=1, to docs/dashboard/ too).

Without /usr/bin/chromium these tests skip, except in CI (LLMROUTER_REQUIRE_SERVICES), where
they fail: `.ci/run` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.admin import admin_key, dashboard_config, send
from tests.conftest import ROOT, Router, need_service, serving

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS = ROOT / "docs" / "dashboard"
CSP = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
XSS = "<script>window.__xss = 1; alert('xss')</script><img src=x onerror=\"alert('img')\">"
OK_REQUESTS = 56  # more than a page of the log (50)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    need_service(f"Chromium at {CHROMIUM}", CHROMIUM.exists())
    tmp = tmp_path_factory.mktemp("dashboard-browser")
    with serving(tmp, dashboard_config(fake_upstream)) as r:
        models = ["fake/ok", "fake/cheap", "fake/ok", "fake/say"]
        for i in range(OK_REQUESTS):
            body = {"model": models[i % 4], "prompt": f"request {i}", "max_tokens": 20}
            assert send(r, {**body, "stream": i % 5 == 0}).status_code == 200
        for _ in range(3):
            assert send(r, {"model": "fake/status-500", "prompt": "this one fails"}).status_code >= 500
        assert send(r, {"model": "fake/fallback", "prompt": "falls back"}).status_code == 200
        assert send(r, {"model": "fake/say", "prompt": XSS, "max_tokens": 200}).status_code == 200
        yield r


@pytest.fixture(scope="module")
def browser(router: Router) -> Iterator[Browser]:

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, router: Router) -> Iterator[Page]:
    """A logged-in page (a fresh browser context: its own cookies), failing the test on any
    dialog (an alert from injected script) or CSP violation (an inline style or script the page
    should not have)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    dialogs: list[str] = []
    problems: list[str] = []
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    tab.on("console", lambda m: problems.append(m.text) if "Security Policy" in m.text else None)
    tab.goto(f"{router.base}/admin/login")
    tab.fill("input[name=key]", admin_key(router, f"browser-{os.urandom(4).hex()}"))
    tab.click("button[type=submit]")
    tab.wait_for_url(f"{router.base}/admin")
    try:
        yield tab
    finally:
        context.close()
    assert dialogs == [], dialogs
    assert problems == [], problems


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000
    if os.environ.get("LLMROUTER_DOCS_SCREENSHOTS"):
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS / f"{name}.png")


def test_overview_shows_the_traffic_sent(page: Page, router: Router) -> None:
    total = OK_REQUESTS + 3 + 1 + 1
    response = page.goto(f"{router.base}/admin?range=24h")
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert page.inner_text("#requests .value") == str(total)
    assert page.inner_text("#error-rate .value") == f"{3 / total * 100:.1f}%"
    # Charts drawn with the real numbers: a bar's title holds its figure.
    titles = page.locator("svg.chart rect title").all_text_contents()
    succeeded = sum(int(t.rsplit(": ", 1)[1]) for t in titles if "· succeeded:" in t)
    failed = sum(int(t.rsplit(": ", 1)[1]) for t in titles if "· failed:" in t)
    assert (succeeded, failed) == (total - 3, 3)
    assert any("· fake/ok:" in t for t in titles)  # spend stacked by model
    # The stylesheet applied (CSP allowed it): the header bar is dark.
    colour = page.eval_on_selector("header.top", "e => getComputedStyle(e).backgroundColor")
    assert colour == "rgb(34, 37, 43)"
    shot(page, "overview")


def test_usage_and_reliability(page: Page, router: Router) -> None:
    page.goto(f"{router.base}/admin/usage?range=24h&by=model")
    assert page.locator("#top-keys tbody tr").count() >= 1
    assert "tests" in page.inner_text("#top-keys")
    shot(page, "usage")
    page.goto(f"{router.base}/admin/reliability?range=24h")
    outcomes = page.inner_text("#outcomes")
    assert re.search(r"upstream_unavailable\s+3", outcomes), outcomes
    # More than one attempt: the fallback, and each failure (tried twice: max_attempts 2).
    assert page.inner_text("#fallbacks .value") == "4"
    assert "fake/ok" in page.inner_text("#health") and "closed" in page.inner_text("#health")
    shot(page, "reliability")


def test_page_the_log_and_find_why_a_request_failed(page: Page, router: Router) -> None:
    page.goto(f"{router.base}/admin/log?range=24h")
    first = page.locator("#log tbody tr td:nth-child(2)").all_inner_texts()
    assert len(first) == 50
    shot(page, "log")
    page.click("#older")
    rest = page.locator("#log tbody tr td:nth-child(2)").all_inner_texts()
    assert len(rest) == OK_REQUESTS + 5 - 50 and not set(first) & set(rest)
    assert page.locator("#older").count() == 0
    # The failed ones, and one of them opened.
    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    failed = page.locator("#log tbody tr")
    assert failed.count() == 3
    failed.first.locator("td:nth-child(2) a").click()
    assert "Failed: status" in page.inner_text("#outcome")
    attempts = page.inner_text("#attempts")
    assert "fake/status-500" in attempts and "upstream_unavailable" in attempts, attempts
    assert page.inner_text("#prompt") == "this one fails"
    shot(page, "request")


def test_a_stored_script_stays_text(page: Page, router: Router) -> None:
    page.goto(f"{router.base}/admin/log?range=24h&model=fake/say")
    page.locator("#log tbody tr td:nth-child(2) a").first.click()
    assert page.inner_text("#prompt") == XSS
    assert page.inner_text("#answer") == XSS
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.scripts.length") == 0
    assert page.locator("main img").count() == 0


def test_keys_create_edit_rotate_revoke(page: Page, router: Router) -> None:
    page.goto(f"{router.base}/admin/keys")
    shot(page, "keys")
    page.fill("#create-key input[name=name]", "made-in-browser")
    page.fill("#create-key input[name=rpm]", "30")
    page.click("#create-key button[type=submit]")
    secret = page.inner_text("#secret-value")
    assert re.fullmatch(r"lr-[0-9A-Za-z]{12}_[0-9A-Za-z]{38}", secret)
    key_id = secret[3:15]
    shot(page, "key-created")
    # It works, and the secret is never shown again.
    assert send(Router(router.base, secret, router.home, router.config, router.proc, router.log),
                {"model": "fake/ok", "prompt": "hi"}).status_code == 200  # fmt: skip
    page.goto(f"{router.base}/admin/keys/{key_id}")
    assert page.locator("#secret").count() == 0 and secret not in page.content()
    assert "30 rpm" in page.inner_text("#key-limits")
    # Edit its limits.
    page.fill("#limits input[name=rpm]", "7")
    page.fill("#limits input[name=models]", "fake/cheap")
    page.click("#limits button[type=submit]")
    limits = page.inner_text("#key-limits")
    assert "7 rpm" in limits and "fake/cheap" in limits, limits
    forbidden = send(Router(router.base, secret, router.home, router.config, router.proc, router.log),
                     {"model": "fake/ok", "prompt": "hi"})  # fmt: skip
    assert forbidden.status_code == 403  # the new limits are in force
    # Rotate: a new secret, shown once; the old one stops working.
    page.click("#rotate button[type=submit]")
    rotated = page.inner_text("#secret-value")
    assert rotated != secret and rotated[3:15] == key_id
    old = send(Router(router.base, secret, router.home, router.config, router.proc, router.log),
               {"model": "fake/cheap", "prompt": "hi"})  # fmt: skip
    assert old.status_code == 401
    # Revoke.
    page.click("#revoke button[type=submit]")
    assert page.inner_text("#key-status") == "revoked"
    gone = send(Router(router.base, rotated, router.home, router.config, router.proc, router.log),
                {"model": "fake/cheap", "prompt": "hi"})  # fmt: skip
    assert gone.status_code == 401


class _Attacker(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.html)))
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args: object) -> None:
        pass


def test_a_forged_form_from_another_origin_is_refused(page: Page, router: Router) -> None:
    # A key to attack, and the session's own CSRF token (the attacker could not know it; given
    # it anyway, the form is still refused for its origin).
    page.goto(f"{router.base}/admin/keys")
    page.fill("#create-key input[name=name]", "target-of-csrf")
    page.click("#create-key button[type=submit]")
    key_id = page.inner_text("#secret-value")[3:15]
    token = page.get_attribute("#revoke input[name=csrf]", "value")
    _Attacker.html = (
        f'<form method="post" action="{router.base}/admin/keys/{key_id}/revoke">'
        f'<input type="hidden" name="csrf" value="{token}"><button id="go">win a prize</button>'
        "</form>"
    ).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        with page.expect_navigation() as navigation:
            page.click("#go")
        assert navigation.value.status == 403
        assert navigation.value.headers["content-security-policy"] == CSP
        assert "another site" in page.inner_text("main")
    finally:
        server.shutdown()
        server.server_close()
    page.goto(f"{router.base}/admin/keys/{key_id}")
    assert page.inner_text("#key-status") == "active"


def test_login_page(browser: Browser, router: Router) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        tab = context.new_page()
        response = tab.goto(f"{router.base}/admin/keys")
        assert tab.url == f"{router.base}/admin/login"  # sent to log in first
        assert response.headers["content-security-policy"] == CSP
        tab.fill("input[name=key]", router.key)  # a key, but not an admin's
        tab.click("button[type=submit]")
        assert "not an admin key" in tab.inner_text(".message")
        assert context.cookies() == []
        shot(tab, "login")
    finally:
        context.close()
