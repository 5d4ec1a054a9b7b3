"""Upstream keys never come back out: not in an answer's body or headers (X-Llmrouter-Attempts
included), not in the log, not in the ledger. One router with canary keys on every kind of
upstream is driven through every fault that has something to say, including upstreams (and the
proxies before them) that quote the request's headers back; then everything the test can read is
searched for the canaries. (conftest.py's `no_upstream_key_anywhere` does the same for the logs
and stores of every router of the whole suite.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ChatFakes, Router, serving

CANARIES = {
    "openai": "sk-canary-openai-5d41402abc4b2a76",
    "oc": "sk-canary-chat-7d793037a0760186",
    "claude": "sk-ant-canary-6f8db599de986fab",
    "gem": "AIzaCanaryGemini-1f3870be274f6c49",
}
HEADER_CANARY = "hdr-canary-c81e728d9d4c2f63"  # a configured header's value, secret too
FAULTS = ("echo-401", "echo-400", "echo-500", "echo-429", "status-401", "lm-stream-error", "hang")
KIND = {"openai": "openai", "oc": "openai_chat", "claude": "anthropic", "gem": "gemini"}


def config(fake: str, chat: ChatFakes) -> str:
    urls = {"openai": f"{fake}/v1", "oc": f"{chat.openai_chat}/v1", "claude": chat.anthropic,
            "gem": chat.gemini}  # fmt: skip
    providers = "".join(
        f"  {name}:\n    kind: {KIND[name]}\n    base_url: {urls[name]}\n    api_key: {key}\n"
        f"    headers: {{x-team-token: {HEADER_CANARY}}}\n"
        "    timeouts: {connect: 1, first_token: 1, idle: 1, total: 2}\n"
        for name, key in CANARIES.items()
    )
    models = "".join(
        f"  - {{id: {name}/{fault}, deployments: [{{provider: {name}, model: {fault}}}]}}\n"
        for name in CANARIES
        for fault in (*FAULTS, "lm")
    )
    return f"""default_model: oc/lm
routing: {{max_attempts: 2, deadline_seconds: 4, retry_budget: {{min_per_second: 10000}}}}
providers:
{providers}models:
{models}"""


@pytest.fixture(scope="module")
def canaried(
    tmp_path_factory: pytest.TempPathFactory,
    fake_upstream: str,
    fake_openai_chat: str,
    fake_anthropic: str,
    fake_gemini: str,
) -> Iterator[tuple[Router, Path]]:
    tmp = tmp_path_factory.mktemp("secrets")
    chat = ChatFakes(fake_openai_chat, fake_anthropic, fake_gemini)
    with serving(tmp, config(fake_upstream, chat)) as router:
        yield router, tmp


def secrets_in(text: str) -> list[str]:
    """The canaries `text` holds, whole or as the start of one (a quote cut short)."""
    return [s for s in (*CANARIES.values(), HEADER_CANARY) if s[:12].lower() in text.lower()]


def test_no_upstream_key_comes_back_out(
    canaried: tuple[Router, Path], fake_upstream: str, fake_openai_chat: str, fake_anthropic: str,
    fake_gemini: str,
) -> None:  # fmt: skip
    router, tmp = canaried
    seen: list[str] = []
    for name in CANARIES:
        for fault in (*FAULTS, "lm"):
            for stream in (False, True):
                body = {"model": f"{name}/{fault}", "prompt": "Hi", "max_tokens": 3, "stream": stream}
                r = httpx.post(
                    f"{router.api}/completions", headers=router.headers(), json=body, timeout=30
                )
                seen.append(f"{r.status_code} {r.headers} {r.text}")
                if fault.startswith("echo-") and not stream:
                    assert r.status_code >= 400, r.text  # the upstream's error, relayed
    for answer in seen:
        assert secrets_in(answer) == [], answer
    # The canaries did reach the upstreams, in the headers each kind sends them in (so the test
    # could fail): the fakes record what they were sent.
    sent = " ".join(
        str(httpx.get(f"{base}/_stats").json().get("credentials", ""))
        for base in (fake_openai_chat, fake_anthropic, fake_gemini)
    )
    assert all(CANARIES[k] in sent for k in ("oc", "claude", "gem")), sent
    # ...and the echoing upstreams did quote them (the router redacted them on the way out).
    last = httpx.get(f"{fake_upstream}/_stats").json()["last_headers"]
    assert last["Authorization"] == f"Bearer {CANARIES['openai']}"
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path.name != "config.yaml":  # the config holds them, by design
            text = path.read_bytes().decode("utf-8", errors="replace")
            assert secrets_in(text) == [], f"{path}: {secrets_in(text)}"
