"""A stream cut mid-way, continued on the next deployment (`resume_streams`, `provider.resume`).

Both deployments run `lm-chain`, a deterministic model whose every word is chosen by the text so
far: sent the prompt and the start of its own answer, it goes on exactly as it would have. So a
resumed stream must equal, word for word, what one healthy deployment sends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.chaos.traffic import hits
from tests.conftest import Router, serving

PROMPT = "Once upon a time"
PROMPT_TOKENS = 4  # the fake counts words
CUTS = ("reset", "hang", "error", "truncated", "nofinish")
RESET_AT = (1, 2, 5, 15)  # text chunks sent before the cut; 16 is the whole answer
PRICE_A, PRICE_B = 1.0, 10.0  # per million tokens, prompt and completion alike


def config(fake: str) -> str:
    def pair(name: str, cut_model: str, resume: bool = True, a: str = "a") -> str:
        return (
            f"  - id: {name}\n    strategy: ordered\n    resume_streams: {str(resume).lower()}\n"
            f"    deployments: [{{provider: {a}, model: {cut_model}, pricing: {{prompt: {PRICE_A}, "
            f"completion: {PRICE_A}}}}}, {{provider: b, model: lm-chain, pricing: {{prompt: "
            f"{PRICE_B}, completion: {PRICE_B}}}}}]"
        )

    models = [pair(f"r/reset-{n}", f"lm-chain-reset-after-{n}") for n in (0, *RESET_AT)]
    models += [pair(f"r/{cut}-2", f"lm-chain-{cut}-after-2") for cut in CUTS if cut != "reset"]
    models += [
        pair("r/reset-16", "lm-chain-reset-after-16"),  # every token sent, not the finish
        pair("r/lostend", "lm-chain-lostend"),
        pair("r/pairs-3", "lm-chain-pairs-reset-after-3"),
        pair("r/pairs-8", "lm-chain-pairs-reset-after-8"),  # all sixteen tokens, not the finish
        pair("r/pairs-lostend", "lm-chain-pairs-lostend"),
        "  - {id: on/null, resume_streams: true, deployments: [{provider: bnull, model: lm-chain}]}",
        "  - {id: off/null, deployments: [{provider: bnull, model: lm-chain}]}",
        "  - {id: on/healthy, resume_streams: true, deployments: [{provider: b, model: lm-chain}]}",
        pair("r/reasoning-2", "lm-chain-reasoning-reset-after-2"),
        "  - id: r30/reset-20\n    strategy: ordered\n    resume_streams: true\n    deployments: "
        "[{provider: a30, model: lm-chain-reset-after-20}, {provider: b30, model: lm-chain}]",
        "  - {id: healthy30, deployments: [{provider: b30, model: lm-chain}]}",
        pair("r/stop-3", "lm-chain-reset-after-3", a="a_nostop"),
        pair("off/reset-2", "lm-chain-reset-after-2", resume=False),
        pair("optout/reset-2", "lm-chain-reset-after-2"),
        pair("nolp/reset-2", "lm-chain-reset-after-2"),
        "  - id: twice\n    strategy: ordered\n    resume_streams: true\n    deployments: "
        "[{provider: a, model: lm-chain-reset-after-2}, {provider: a, model: "
        "lm-chain-reset-after-3}, {provider: b, model: lm-chain}]",
        "  - {id: alone/reset-2, resume_streams: true, deployments: "
        "[{provider: a, model: lm-chain-reset-after-2}]}",
        "  - {id: chain/reset-9, deployments: [{provider: a, model: lm-chain-reset-after-9}]}",
        "  - {id: healthy, deployments: [{provider: b, model: lm-chain}]}",
        "  - {id: dl/hang, deployments: [{provider: slow, model: lm-chain-hang-after-0}]}",
    ]
    models_text = "\n".join(models)
    timeouts = "timeouts: {connect: 1, first_token: 2, idle: 1, total: 5}"
    return f"""default_model: healthy
routing:
  seed: 7
  deadline_seconds: 10
  health: {{consecutive_failures: 1000000, min_attempts: 1000000}}
providers:
  a: {{kind: openai, base_url: {fake}/v1, {timeouts}}}
  a_nostop: {{kind: openai, base_url: {fake}/v1, unsupported_parameters: [stop], {timeouts}}}
  b: {{kind: openai, base_url: {fake}/v1, {timeouts}}}
  slow: {{kind: openai, base_url: {fake}/v1, timeouts: {{first_token: 30, idle: 30, total: 60}}}}
  a30: {{kind: openai, base_url: {fake}/v1, defaults: {{max_tokens: 30}}, {timeouts}}}
  bnull: {{kind: openai, base_url: {fake}/v1, defaults: {{max_tokens: null}}, {timeouts}}}
  b30: {{kind: openai, base_url: {fake}/v1, defaults: {{max_tokens: 30}}, {timeouts}}}
models:
{models_text}
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    with serving(tmp_path_factory.mktemp("resume"), config(fake_upstream)) as r:
        yield r


def healthy(router: Router, **extra: Any) -> dict[str, Any]:
    body = {"model": "healthy", "prompt": PROMPT, "max_tokens": 16, **extra}
    r = httpx.post(f"{router.api}/completions", headers=router.headers(), json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def streamed(router: Router, model: str, **extra: Any) -> tuple[httpx.Response, list[dict[str, Any]]]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    body = {k: v for k, v in body.items() if v is not ...}  # `...`: left out of the request
    with httpx.stream(
        "POST", f"{router.api}/completions", headers=router.headers(), json=body, timeout=30
    ) as r:
        r.read()
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return r, events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(c["text"] for e in events for c in e.get("choices", []))


def record(router: Router, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        r = httpx.get(f"{router.api}/generation", params={"id": request_id}, headers=router.headers())
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return r.json()["data"]  # type: ignore[no-any-return]
        time.sleep(0.05)


def log_line(router: Router, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in router.log.read_text().splitlines():
            if request_id in line:
                return json.loads(line)  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


@pytest.mark.parametrize("n", [0, *RESET_AT])
def test_a_stream_reset_after_n_tokens_is_continued_into_the_same_answer(
    router: Router, fake: str, n: int
) -> None:
    whole = healthy(router)["choices"][0]["text"]
    r, events = streamed(router, f"r/reset-{n}")
    assert r.status_code == 200
    assert "data: [DONE]" in r.text
    assert text_of(events) == whole  # nothing lost, nothing said twice
    finish = next(c for e in events for c in e["choices"] if c["finish_reason"])
    assert finish["finish_reason"] == "length"  # max_tokens counted across the seam
    finishing = next(e for e in events if any(c["finish_reason"] for c in e["choices"]))
    assert finishing["provider"] == "b"  # the deployment that finished
    usage = events[-1]["usage"]
    assert usage == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 16, "total_tokens": 20}
    assert hits(fake) == {f"lm-chain-reset-after-{n}": 1, "lm-chain": 2}  # (and the healthy one)
    if n == 0:  # nothing was sent before it failed: an ordinary fallback, not a resumption
        return
    assert [e["provider"] for e in events[:n]] == ["a"] * n
    got = record(router, events[0]["id"])
    assert [a.split()[:2] for a in got["attempts"]] == [
        [f"a/lm-chain-reset-after-{n}", "upstream_unavailable"],
        ["b/lm-chain", "ok"],
    ]
    assert got["attempts"][1].endswith(" resumed")
    line = log_line(router, events[0]["id"])  # the access log says the same
    assert [a["target"] for a in line["attempts"]] == [f"a/lm-chain-reset-after-{n}", "b/lm-chain"]
    assert line["provider"] == "b" and line["completion_tokens"] == 16
    assert (got["provider"], got["prompt_tokens"], got["completion_tokens"]) == ("b", 4, 16)
    # Each deployment at its own price for what it was sent and what it gave.
    cost = (PRICE_A * (PROMPT_TOKENS + n) + PRICE_B * (PROMPT_TOKENS + n + 16 - n)) / 1e6
    assert got["cost"] == pytest.approx(cost)


@pytest.mark.parametrize("cut", [c for c in CUTS if c != "reset"])
def test_every_way_a_stream_breaks_off_is_continued(router: Router, fake: str, cut: str) -> None:
    whole = healthy(router)["choices"][0]["text"]
    started = time.monotonic()
    r, events = streamed(router, f"r/{cut}-2")
    assert "data: [DONE]" in r.text
    assert text_of(events) == whole
    assert events[-1]["usage"]["completion_tokens"] == 16
    assert hits(fake)[f"lm-chain-{cut}-after-2"] == 1
    if cut == "hang":  # cut by the 1 s idle timeout
        assert 1.0 <= time.monotonic() - started < 3.0


def test_a_stop_sequence_across_the_seam_is_found(router: Router, fake: str) -> None:
    words = healthy(router)["choices"][0]["text"].split(" ")[1:]  # each word has its space
    stop = f" {words[2]} {words[3]}"  # the third and fourth tokens: the seam falls between them
    expected = healthy(router, stop=[stop])["choices"][0]
    assert expected["finish_reason"] == "stop"
    # a_nostop leaves stops to the router; it sends three tokens, the third the stop's start.
    _, events = streamed(router, "r/stop-3", stop=[stop])
    assert text_of(events) == expected["text"] == f" {words[0]} {words[1]}"
    finish = next(c for e in events for c in e["choices"] if c["finish_reason"])
    assert finish["finish_reason"] == "stop"
    assert hits(fake)["lm-chain-reset-after-3"] == 1


def test_resumption_is_off_by_default_and_the_request_can_turn_it_on(router: Router, fake: str) -> None:
    r, events = streamed(router, "off/reset-2")
    assert "data: [DONE]" not in r.text  # as before: the text so far, then one error event
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    assert len(text_of(events[:-1]).split()) == 2
    r, events = streamed(router, "off/reset-2", provider={"resume": True})
    assert "data: [DONE]" in r.text
    assert text_of(events) == healthy(router)["choices"][0]["text"]


def test_the_request_can_turn_it_off(router: Router, fake: str) -> None:
    _, events = streamed(router, "optout/reset-2", provider={"resume": False})
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    assert hits(fake) == {"lm-chain-reset-after-2": 1}


@pytest.mark.parametrize(
    "extra",
    [{"logprobs": 1}, {"echo": True}, {"suffix": "."}, {"n": 2}, {"prompt": [PROMPT, PROMPT]}],
    ids=["logprobs", "echo", "suffix", "n", "two-prompts"],
)
def test_a_request_whose_continuation_would_mean_something_else_is_not_resumed(
    router: Router, fake: str, extra: dict[str, Any]
) -> None:
    r, events = streamed(router, "nolp/reset-2", **extra)
    assert r.status_code == 200
    assert "data: [DONE]" not in r.text
    assert "error" in events[-1]
    assert "lm-chain" not in hits(fake)  # not asked to continue


def test_a_plan_of_one_deployment_continues_on_it_again_until_max_attempts(
    router: Router, fake: str
) -> None:
    """The executor's next pass over the plan comes back to the same deployment: four attempts
    (max_attempts), two tokens each, then the stream ends with the last one's error."""
    r, events = streamed(router, "alone/reset-2")
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    assert "data: [DONE]" not in r.text
    words = healthy(router)["choices"][0]["text"].split()
    assert text_of(events[:-1]) == "".join(f" {w}" for w in words[:8])
    assert hits(fake) == {"lm-chain-reset-after-2": 4, "lm-chain": 1}
    got = record(router, events[0]["id"])
    assert [a.split()[1] for a in got["attempts"]] == ["upstream_unavailable"] * 4
    assert [a.endswith(" resumed") for a in got["attempts"]] == [False, True, True, True]


def test_a_stream_cut_after_its_last_token_ends_by_length_and_is_billed(
    router: Router, fake: str
) -> None:
    whole = healthy(router)["choices"][0]["text"]
    r, events = streamed(router, "r/reset-16")
    assert "data: [DONE]" in r.text
    assert text_of(events) == whole
    finish = next(c for e in events for c in e["choices"] if c["finish_reason"])
    assert finish["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 16
    got = record(router, events[0]["id"])
    assert got["completion_tokens"] == 16 and got["cost"] > 0
    assert [a.split()[:2] for a in got["attempts"]] == [
        ["a/lm-chain-reset-after-16", "upstream_unavailable"]
    ]
    assert hits(fake) == {"lm-chain-reset-after-16": 1, "lm-chain": 1}  # (the healthy one)


def test_a_whole_answer_whose_end_was_lost_is_billed_and_held_against_its_deployment(
    router: Router, fake: str
) -> None:
    whole = healthy(router)["choices"][0]["text"]
    r, events = streamed(router, "r/lostend")
    assert "data: [DONE]" in r.text
    assert text_of(events) == whole
    assert events[-1]["usage"]["completion_tokens"] == 16
    got = record(router, events[0]["id"])
    assert got["completion_tokens"] == 16 and got["cost"] > 0
    assert got["attempts"][0].split()[1] == "upstream_unavailable"  # not "ok"
    assert hits(fake) == {"lm-chain-lostend": 1, "lm-chain": 1}


def test_without_max_tokens_the_seam_counts_from_the_deployment_s_default(
    router: Router, fake: str
) -> None:
    body = {"model": "healthy30", "prompt": PROMPT}
    r = httpx.post(f"{router.api}/completions", headers=router.headers(), json=body, timeout=30)
    whole = r.json()["choices"][0]["text"]
    assert len(whole.split()) == 30  # the provider's `defaults: {max_tokens: 30}`
    _, events = streamed(router, "r30/reset-20", max_tokens=...)  # (left out)
    assert text_of(events) == whole
    assert events[-1]["usage"]["completion_tokens"] == 30


def test_tokens_counted_by_the_upstream_are_used_at_the_seam(router: Router, fake: str) -> None:
    """Two tokens a chunk, with the count so far in each (vLLM's continuous usage stats): cut
    after three chunks, six tokens, and the continuation is asked for the other ten."""
    whole = healthy(router)["choices"][0]["text"]
    _, events = streamed(router, "r/pairs-3")
    assert text_of(events) == whole
    assert events[-1]["usage"]["completion_tokens"] == 16
    assert httpx.get(f"{fake}/_stats").json()["last_body"]["max_tokens"] == 10


@pytest.mark.parametrize("model", ["r/pairs-8", "r/pairs-lostend"])
def test_an_answer_the_splice_ends_itself_keeps_the_upstream_s_own_count(
    router: Router, fake: str, model: str
) -> None:
    """Cut after its last token (max_tokens reached), or after its finish (the end lost): the
    count the deployment streamed, two tokens a chunk, is the answer's usage, not a chunk a
    token."""
    whole = healthy(router)["choices"][0]["text"]
    r, events = streamed(router, model)
    assert "data: [DONE]" in r.text
    assert text_of(events) == whole
    usage = events[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, 16)
    got = record(router, events[0]["id"])
    assert (got["prompt_tokens"], got["completion_tokens"]) == (PROMPT_TOKENS, 16)
    assert got["cost"] == pytest.approx(PRICE_A * (PROMPT_TOKENS + 16) / 1e6)


@pytest.mark.parametrize(
    ("on", "off", "words"), [("on/null", "off/null", 40), ("on/healthy", "healthy", 16)]
)
def test_a_resumable_stream_that_does_not_fail_is_the_stream_it_would_have_been(
    router: Router, fake: str, on: str, off: str, words: int
) -> None:
    """Without max_tokens: a provider whose `defaults` say no limit (null) keeps it, and one
    without defaults gets the API's 16, resumable or not."""
    _, resumable_events = streamed(router, on, max_tokens=...)
    _, plain_events = streamed(router, off, max_tokens=...)
    assert text_of(resumable_events) == text_of(plain_events)
    assert len(text_of(plain_events).split()) == words


def test_a_stream_with_reasoning_of_its_own_is_not_continued(router: Router, fake: str) -> None:
    """Its reasoning came in a field of its own, which a continuation would not be sent."""
    _, events = streamed(router, "r/reasoning-2")
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    assert hits(fake) == {"lm-chain-reasoning-reset-after-2": 1}


def test_a_continuation_on_another_model_of_the_request(router: Router, fake: str) -> None:
    """The next deployment of the plan may be the next model the client named."""
    r, events = streamed(router, "chain/reset-9", models=["healthy"], provider={"resume": True})
    assert "data: [DONE]" in r.text
    assert text_of(events) == healthy(router)["choices"][0]["text"]
    assert {e["model"] for e in events[:9]} == {"chain/reset-9"}
    assert {e["model"] for e in events[9:] if e["choices"]} == {"healthy"}


def test_a_continuation_that_breaks_off_too_is_continued_again(router: Router, fake: str) -> None:
    r, events = streamed(router, "twice")
    assert "data: [DONE]" in r.text
    assert text_of(events) == healthy(router)["choices"][0]["text"]
    assert [e["provider"] for e in events if e["choices"]][:6] == ["a"] * 5 + ["b"]
    got = record(router, events[0]["id"])
    assert [a.split()[:2] + a.split()[3:] for a in got["attempts"]] == [
        ["a/lm-chain-reset-after-2", "upstream_unavailable"],
        ["a/lm-chain-reset-after-3", "upstream_unavailable", "resumed"],
        ["b/lm-chain", "ok", "resumed"],
    ]
    assert (got["prompt_tokens"], got["completion_tokens"]) == (PROMPT_TOKENS, 16)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    """No retry budget at all, and a 3 s deadline."""
    cfg = config(fake_upstream).replace(
        "  deadline_seconds: 10\n",
        "  deadline_seconds: 3\n  retry_budget: {ratio: 0, min_per_second: 0}\n",
    )
    with serving(tmp_path_factory.mktemp("resume-strict"), cfg) as r:
        yield r


def test_a_continuation_spends_the_retry_budget_like_any_other_attempt(
    strict: Router, fake: str
) -> None:
    r, events = streamed(strict, "nolp/reset-2")  # its other deployment: a retry
    assert events[-1]["error"]["code"] == "upstream_unavailable"
    got = record(strict, events[0]["id"])
    assert [a.split()[:2] for a in got["attempts"]] == [
        ["a/lm-chain-reset-after-2", "upstream_unavailable"],
        ["b/lm-chain", "retry_budget_exhausted"],
    ]
    # A model the client named is its own instruction: its first attempt is free.
    r, events = streamed(strict, "alone/reset-2", models=["healthy"])
    assert "data: [DONE]" in r.text
    assert text_of(events) == healthy(strict)["choices"][0]["text"]


def test_a_continuation_ends_at_the_request_s_deadline(strict: Router, fake: str) -> None:
    started = time.monotonic()
    r, events = streamed(strict, "alone/reset-2", models=["dl/hang"])  # it never answers
    took = time.monotonic() - started
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    assert len(text_of(events[:-1]).split()) == 2
    assert 2.9 < took < 4.5
    assert "data: [DONE]" not in r.text
