"""The chat kinds under faults: for each kind (openai_chat, anthropic, gemini) and each fault of its
fake, streamed and not, on /completions and on /chat/completions, what the client sees and what
the attempts say. Every fault falls back to
the next deployment before the client's first byte; after it, a stream ends with an error event
and never stops short without one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import CHAT_FAULTS, UPSTREAM_KEYS, ChatFakes, Router, serving
from tests.spec import assert_error

KINDS = {
    "oc": ("openai_chat", "fake_openai_chat", "/v1"),
    "claude": ("anthropic", "fake_anthropic", ""),
    "gem": ("gemini", "fake_gemini", ""),
}
# What the fault's attempt is called in X-Llmrouter-Attempts.
CODES = {
    "status-400": "upstream_rejected",
    "status-401": "upstream_auth_failed",
    "status-429": "upstream_rate_limited",
    "status-500": "upstream_unavailable",
    "hang": "upstream_timeout",
    "reset-before": "upstream_unavailable",
    "lm-reset-after-3": "upstream_unavailable",
    "lm-hang-after-3": "upstream_timeout",
    "lm-truncated": "upstream_unavailable",
    "lm-stream-error": "upstream_unavailable",
    "lm-malformed": "upstream_unavailable",
}
FAULTS = [f for f in CHAT_FAULTS if f in CODES]
# Anthropic's in-band error (the fake's, as the API's usual one) is `overloaded_error`: load.
KIND_CODES = {("claude", "lm-stream-error"): "upstream_rate_limited"}


def code(kind: str, fault: str) -> str:
    return KIND_CODES.get((kind, fault), CODES[fault])


# Kind-specific: (model, its code, stream code if it differs)
SPECIFIC = [
    ("claude", "overloaded", "upstream_rate_limited"),
    ("gem", "resource-exhausted", "upstream_rate_limited"),
]


SIDES = ("_whole", "_stream", "_whole_chat", "_stream_chat")


def chaos_config(fakes: ChatFakes, legacy: str) -> str:
    urls = {"oc": fakes.openai_chat + "/v1", "claude": fakes.anthropic, "gem": fakes.gemini}
    timeouts = "{connect: 1, first_token: 1, idle: 1, total: 2}"
    providers = "".join(
        f"  {kind}{side}: {{kind: {KINDS[kind][0]}, base_url: {urls[kind]}, "
        f"api_key: {UPSTREAM_KEYS[kind]}, timeouts: {timeouts}}}\n"
        for kind in KINDS
        for side in SIDES
    )
    models = "".join(
        f"  - id: {kind}{side}/{fault}\n    strategy: ordered\n"
        f"    deployments: [{{provider: {kind}{side}, model: {fault}}}, "
        f"{{provider: {kind}{side}, model: lm}}]\n"
        for kind in KINDS
        for side in SIDES
        for fault in [*FAULTS, *(f for k, f, _ in SPECIFIC if k == kind)]
    )
    singles = "".join(
        f"  - {{id: {kind}/{fault}, deployments: [{{provider: {kind}_whole, model: {fault}}}]}}\n"
        for kind in KINDS
        for fault in ("context-400", "lm-refuse", "refuse", "lm-safety-finish")
    )
    resume = (
        "  - id: resume/onto-chat\n    strategy: ordered\n    resume_streams: true\n"
        "    deployments: [{provider: legacy, model: lm-chain-reset-after-2}, "
        "{provider: oc_stream, model: lm}]\n"
    )
    return f"""default_model: oc_whole/lm-truncated
routing:
  max_attempts: 3
  deadline_seconds: 5
  backoff_base_ms: 10
  backoff_max_ms: 40
  retry_budget: {{min_per_second: 100000}}
  health: {{consecutive_failures: 1000000, min_attempts: 1000000, rate_limit_skip_seconds: 0}}
providers:
  legacy: {{kind: openai, base_url: {legacy}/v1, timeouts: {timeouts}}}
{providers}models:
{models}{singles}{resume}"""


@pytest.fixture(scope="module")
def chaos(
    tmp_path_factory: pytest.TempPathFactory,
    fake_upstream: str,
    fake_openai_chat: str,
    fake_anthropic: str,
    fake_gemini: str,
) -> Iterator[Router]:
    fakes = ChatFakes(fake_openai_chat, fake_anthropic, fake_gemini)
    with serving(tmp_path_factory.mktemp("chat-chaos"), chaos_config(fakes, fake_upstream)) as r:
        yield r


# Both endpoints take the same road: a prompt, or the same words as a user message.
ENDPOINTS = ["completions", "chat/completions"]


def side(stream: bool, endpoint: str) -> str:
    """The providers a test uses: apart per endpoint, so that one's Retry-After (a 429's) does not
    make the next skip a deployment."""
    return ("_stream" if stream else "_whole") + ("_chat" if endpoint != "completions" else "")


def post(router: Router, model: str, stream: bool, endpoint: str = "completions") -> httpx.Response:
    body: dict[str, Any] = {"model": model, "max_tokens": 6, "temperature": 0, "stream": stream}
    if endpoint == "completions":
        body["prompt"] = "Hi there"
    else:
        body["messages"] = [{"role": "user", "content": "Hi there"}]
    with httpx.stream(
        "POST", f"{router.api}/{endpoint}", headers=router.headers(), json=body, timeout=30
    ) as r:
        r.read()
    return r


def events(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def attempts(r: httpx.Response) -> list[list[str]]:
    return [a.split()[:2] for a in r.headers["x-llmrouter-attempts"].split(", ")]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_unstreamed_falls_back_to_the_next_deployment(
    chaos: Router, kind: str, fault: str, endpoint: str
) -> None:
    at = f"{kind}{side(False, endpoint)}"
    r = post(chaos, f"{at}/{fault}", stream=False, endpoint=endpoint)
    assert r.status_code == 200, r.text
    assert attempts(r) == [[f"{at}/{fault}", code(kind, fault)], [f"{at}/lm", "ok"]]
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_streamed_falls_back_or_ends_with_an_error_event(
    chaos: Router, kind: str, fault: str, endpoint: str
) -> None:
    at = f"{kind}{side(True, endpoint)}"
    r = post(chaos, f"{at}/{fault}", stream=True, endpoint=endpoint)
    assert r.status_code == 200, r.text
    got = events(r)
    errors = [e for e in got if "error" in e]
    finishes = [c["finish_reason"] for e in got for c in e.get("choices", []) if c.get("finish_reason")]
    if errors:  # after the first byte: the error event is the stream's last, and no [DONE]
        assert got[-1] is errors[0] and len(errors) == 1
        assert errors[0]["error"]["code"] == code(kind, fault)
        assert "data: [DONE]" not in r.text
        assert fault.startswith("lm-")  # only a fault after some text can come after the commit
    else:  # before it: the next deployment's whole answer
        assert finishes == ["length"] and r.text.rstrip().endswith("data: [DONE]")
        assert attempts(r) == [[f"{at}/{fault}", code(kind, fault)], [f"{at}/lm", "ok"]]


@pytest.mark.parametrize(("kind", "fault", "code"), SPECIFIC)
@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_and_exhausted_are_load_and_fall_back(
    chaos: Router, kind: str, fault: str, code: str, stream: bool
) -> None:
    side = "_stream" if stream else "_whole"
    r = post(chaos, f"{kind}{side}/{fault}", stream)
    assert r.status_code == 200, r.text
    assert attempts(r)[0] == [f"{kind}{side}/{fault}", code]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_is_the_models_400(
    chaos: Router, kind: str, stream: bool, endpoint: str
) -> None:
    r = post(chaos, f"{kind}/context-400", stream, endpoint)
    assert assert_error(r, 400)["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True])
def test_refusals_are_content_filter(chaos: Router, stream: bool) -> None:
    r = post(chaos, "claude/lm-refuse", stream)  # a 200 with stop_reason refusal
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0] if not stream else events(r)[-1]["choices"][0]
    assert (choice["finish_reason"], choice["native_finish_reason"]) == ("content_filter", "refusal")
    r = post(chaos, "gem/lm-safety-finish", stream)
    choice = r.json()["choices"][0] if not stream else events(r)[-1]["choices"][0]
    assert (choice["finish_reason"], choice["native_finish_reason"]) == ("content_filter", "SAFETY")
    for model in ("gem/refuse", "oc/refuse"):  # the prompt refused: another may take it; none here
        r = post(chaos, model, stream)
        assert assert_error(r, 400)["error"]["code"] == "content_filter"


def test_a_cut_stream_is_never_continued_on_a_chat_api(chaos: Router, fake_openai_chat: str) -> None:
    """A chat API sent the text so far would answer it as a message, not go on with it: a cut
    stream is continued elsewhere (here: its own deployment again, on the next pass), never
    there."""
    httpx.post(f"{fake_openai_chat}/_reset")
    r = post(chaos, "resume/onto-chat", stream=True)
    got = events(r)
    assert {e.get("provider") for e in got if "choices" in e} == {"legacy"}, r.text
    assert httpx.get(f"{fake_openai_chat}/_stats").json()["requests"] == 0
