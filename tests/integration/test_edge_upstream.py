"""What comes back from upstreams is held at the edge too (issue 11): redirects are not followed,
configured secrets never reach a client, a log or the store, and a non-streamed request leaves an
upstream that does not answer after the time to first byte."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Router, serving

API_KEY = "sk-canary-key-0123456789abcdef"
HEADER_SECRET = "hdr-canary-9876543210fedcba"
CANARIES = (API_KEY, HEADER_SECRET)


def config(fake: str) -> str:
    models = "\n".join(
        f"  - id: m/{name}\n    deployments: [{{provider: canary, model: {name}}}]"
        for name in ("echo-400", "echo-422", "echo-500", "echo-503", "echo-200", "hang", "redirect-307")
    )
    return f"""default_model: m/echo-400
routing:
  max_attempts: 2
  retry_budget: {{min_per_second: 1000}}
  health: {{consecutive_failures: 1000000, min_attempts: 1000000}}
providers:
  canary:
    kind: openai
    base_url: {fake}/v1
    api_key: {API_KEY}
    headers: {{X-Upstream-Token: {HEADER_SECRET}}}
    timeouts: {{connect: 1, first_token: 1, idle: 1, total: 30}}
  spare:
    kind: openai
    base_url: {fake}/v1
models:
{models}
  - id: m/redirect-then-ok
    strategy: ordered
    deployments:
      - {{provider: canary, model: redirect-307}}
      - {{provider: spare, model: ok}}
  - id: m/redirect-308
    deployments: [{{provider: canary, model: redirect-308}}]
"""


@pytest.fixture(scope="module")
def router(fake_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    with serving(tmp_path_factory.mktemp("edge-upstream"), config(fake_upstream)) as r:
        yield r


def complete(router: Router, model: str, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{router.api}/completions",
        headers=router.headers(),
        json={"model": model, "prompt": "hi", "max_tokens": 3, **extra},
        timeout=60,
    )


def all_stored_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())


# -- 7. secrets are redacted --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["m/echo-400", "m/echo-422", "m/echo-500", "m/echo-503", "m/echo-200"])
def test_an_upstream_error_quoting_our_credentials_reaches_the_client_redacted(
    router: Router, model: str
) -> None:
    r = complete(router, model)
    assert r.status_code >= 400
    message = r.json()["error"]["message"]
    assert "proxy saw" in message, message  # the upstream's words are still relayed...
    for canary in CANARIES:
        assert canary not in r.text  # ...but not our secrets
    assert "[redacted]" in message


def test_a_stream_error_event_quoting_our_credentials_is_redacted(router: Router) -> None:
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=router.headers(),
        json={"model": "m/echo-200", "prompt": "hi", "max_tokens": 3, "stream": True},
        timeout=60,
    ) as r:
        text = r.read().decode()
    assert r.status_code == 200
    assert "proxy saw" in text, text  # the error event, after the first chunk
    for canary in CANARIES:
        assert canary not in text


def test_no_secret_reaches_the_log_or_the_store(router: Router) -> None:
    for model in ("m/echo-400", "m/echo-500", "m/echo-200"):
        complete(router, model)
        complete(router, model, stream=True)
    time.sleep(0.5)  # the ledger's writer
    log = router.log.read_bytes()
    assert b"request" in log
    stored = all_stored_bytes(router.home)
    for canary in CANARIES:
        assert canary.encode() not in log
        assert canary.encode() not in stored


# -- 6. redirects are not followed --------------------------------------------------------------


def test_a_redirect_is_an_upstream_failure_and_the_next_deployment_answers(
    router: Router, fake_upstream: str
) -> None:
    before = httpx.get(f"{fake_upstream}/_stats").json()["redirected"]
    r = complete(router, "m/redirect-then-ok")
    assert r.status_code == 200, r.text
    attempts = r.headers["x-llmrouter-attempts"]
    assert "redirect-307 upstream_unavailable" in attempts, attempts
    assert httpx.get(f"{fake_upstream}/_stats").json()["redirected"] == before


@pytest.mark.parametrize("model", ["m/redirect-307", "m/redirect-308"])
def test_a_redirect_alone_is_a_502_and_the_prompt_goes_nowhere(
    router: Router, fake_upstream: str, model: str
) -> None:
    before = httpx.get(f"{fake_upstream}/_stats").json()["redirected"]
    for stream in (False, True):
        r = complete(router, model, stream=stream)
        assert r.status_code == 502, r.text
        assert "redirect" in r.json()["error"]["message"]
    assert httpx.get(f"{fake_upstream}/_stats").json()["redirected"] == before


# -- 10. a hung upstream is left after the time to first byte, streamed or not -------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_never_answers_is_left_after_first_token(router: Router, stream: bool) -> None:
    started = time.monotonic()
    r = complete(router, "m/hang", stream=stream)
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert took < 5, f"{took:.1f} s: first_token is 1 s (total is 30 s)"
