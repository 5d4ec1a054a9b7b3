"""An OpenAI-compatible upstream's failures, mapped into our error shape; parameters passed on."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import Router
from tests.spec import assert_error, validate


def post(router: Router, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "Hi", "max_tokens": 3, **extra}
    return httpx.post(f"{router.api}/completions", headers=router.headers(), json=body, timeout=30)


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("fake/status-401", 502, "upstream_auth_failed"),
        ("fake/status-500", 502, "upstream_unavailable"),
        ("fake/status-503", 502, "upstream_unavailable"),
        ("fake/status-404", 502, "upstream_unavailable"),
        ("fake/status-400", 400, "upstream_rejected"),
        ("fake/malformed", 502, "upstream_unavailable"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_mapped(
    router: Router, model: str, status: int, code: str, stream: bool
) -> None:
    r = post(router, model, stream=stream)
    error = assert_error(r, status)["error"]
    assert error["code"] == code
    assert "upstream-secret" not in r.text


def test_upstream_that_hangs_is_504_within_its_deadline(router: Router, fake_upstream: str) -> None:
    httpx.post(f"{fake_upstream}/_reset")
    started = time.monotonic()
    r = post(router, "fake/hang")
    elapsed = time.monotonic() - started
    assert assert_error(r, 504)["error"]["code"] == "upstream_timeout"
    # Two attempts (the test router's max_attempts), each cut at the provider's first_token of
    # 3 s: no response headers by then (issue 11; its total is 4 s).
    assert httpx.get(f"{fake_upstream}/_stats").json()["requests"] == 2
    assert 5.9 < elapsed < 7.5


def test_fallback_to_the_next_deployment_before_the_first_byte(router: Router) -> None:
    r = post(router, "fake/fallback")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fake/fallback"
    attempts = r.headers["x-llmrouter-attempts"]
    assert attempts.startswith("fake/status-503 upstream_unavailable")
    assert "fake/ok ok" in attempts


def test_models_list_is_a_fallback_chain(router: Router) -> None:
    r = post(router, "fake/status-500", models=["fake/ok"])
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fake/ok"


def test_every_parameter_is_passed_on(router: Router, fake_upstream: str) -> None:
    params = {
        "best_of": 2,
        "echo": True,
        "frequency_penalty": 0.5,
        "logit_bias": {"50": -100},
        "logprobs": 2,
        "n": 2,
        "presence_penalty": -0.5,
        "seed": 7,
        "stop": ["\n"],
        "suffix": "!",
        "temperature": 0.3,
        "top_p": 0.9,
        "user": "end-user-1",
        "metadata": {"team": "a"},
    }
    r = post(router, "lm/full", **params)
    assert r.status_code == 200, r.text
    validate(r.json(), "CompletionResponse", served=True)  # echo's first token_logprob is null
    got = httpx.get(f"{fake_upstream}/_stats").json()
    sent = got["last_body"]
    assert sent["model"] == "lm"  # the deployment's upstream name
    assert sent["prompt"] == "Hi" and sent["max_tokens"] == 3
    for name, value in params.items():
        if name in ("user", "metadata"):
            assert name not in sent  # kept by the router unless the provider forwards them
        else:
            assert sent[name] == value, name
    assert got["last_headers"]["Authorization"] == "Bearer upstream-secret"
    assert r.json()["system_fingerprint"] == "fp_lm"


def test_user_and_metadata_stay_with_the_request_record(router: Router, fake_upstream: str) -> None:
    metadata = {"team": "search", "quote": 'a "b" \\ c'}
    r = post(router, "lm/full", user="end-user-9", metadata=metadata)
    assert r.status_code == 200, r.text
    sent = httpx.get(f"{fake_upstream}/_stats").json()["last_body"]
    assert "user" not in sent and "metadata" not in sent
    line = None
    deadline = time.monotonic() + 2
    while line is None and time.monotonic() < deadline:
        lines = router.log.read_text().splitlines()
        line = next((json.loads(x) for x in lines if r.json()["id"] in x), None)
        time.sleep(0.02)
    assert line is not None
    assert line["user"] == "end-user-9" and line["metadata"] == metadata


def test_with_a_format_to_check_the_stops_are_the_routers(router: Router, fake_upstream: str) -> None:
    # so that it knows a choice was cut by a stop (returned as it is) rather than ended badly
    r = post(router, "lm/full", response_format={"type": "json_object"}, stop=["\n"])
    assert r.status_code == 200, r.text
    sent = httpx.get(f"{fake_upstream}/_stats").json()["last_body"]
    assert sent["response_format"] == {"type": "json_object"} and "stop" not in sent
    assert r.headers["x-llmrouter-emulated"] == "stop"


def test_token_prompts_pass_through_unchanged(router: Router, fake_upstream: str) -> None:
    post(router, "fake/ok", prompt=[[1, 2], [3]])
    assert httpx.get(f"{fake_upstream}/_stats").json()["last_body"]["prompt"] == [[1, 2], [3]]


def test_upstream_connections_are_pooled(router: Router, fake_upstream: str) -> None:
    httpx.post(f"{fake_upstream}/_reset")
    with httpx.Client() as client:
        for _ in range(30):
            r = client.post(
                f"{router.api}/completions",
                headers=router.headers(),
                json={"model": "fake/ok", "prompt": "Hi"},
            )
            assert r.status_code == 200
    stats = httpx.get(f"{fake_upstream}/_stats").json()
    assert stats["requests"] == 30
    assert stats["connections"] <= 2  # kept alive, not one connection a request


def test_unreachable_upstream_is_502(tmp_path, fake_upstream: str) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import free_port, router_config, start_router, stop

    dead = f"http://127.0.0.1:{free_port()}"
    config = router_config(fake_upstream, None).replace(
        f"base_url: {fake_upstream}/v1", f"base_url: {dead}/v1"
    )
    r = start_router(tmp_path, config)
    try:
        error = assert_error(post(r, "fake/ok"), 502)["error"]
        assert error["code"] == "upstream_unavailable"
    finally:
        stop(r.proc)


def test_when_every_attempt_fails_the_error_says_what_was_tried(router: Router) -> None:
    r = post(router, "fake/status-500", models=["fake/status-503"])
    assert assert_error(r, 502)["error"]["code"] == "upstream_unavailable"
    attempts = r.headers["x-llmrouter-attempts"].split(", ")
    assert [a.split()[:2] for a in attempts] == [
        ["fake/status-500", "upstream_unavailable"],
        ["fake/status-503", "upstream_unavailable"],
    ]


def test_an_upstream_400_moves_on_to_the_next_deployment_never_back(
    router: Router, fake_upstream: str
) -> None:
    """The router checked the request before sending it, so an upstream's 400 is most often a
    limit of that upstream the config does not declare: another deployment may take it."""
    httpx.post(f"{fake_upstream}/_reset")
    r = post(router, "fake/status-400", models=["fake/ok"])
    assert r.status_code == 200, r.text
    attempts = [a.split()[:2] for a in r.headers["x-llmrouter-attempts"].split(", ")]
    assert attempts == [["fake/status-400", "upstream_rejected"], ["fake/ok", "ok"]]
    assert httpx.get(f"{fake_upstream}/_stats").json()["hits"] == {"status-400": 1, "ok": 1}
    r = post(router, "fake/status-400")  # alone: the upstream's 400 is the answer, asked once
    assert assert_error(r, 400)["error"]["code"] == "upstream_rejected"
    assert len(r.headers["x-llmrouter-attempts"].split(", ")) == 1


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": 1}, "logprobs"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"response_format": {"type": "grammar", "grammar": 'root ::= "a"'}}, "response_format"),
    ],
)
def test_declared_gaps_are_refused_or_routed_around(
    router: Router, extra: dict[str, object], param: str
) -> None:
    error = assert_error(post(router, "basic/ok", **extra), 400, param)["error"]
    assert error["code"] == "unsupported_parameter" and "basic/ok" in error["message"]
    r = post(router, "basic/ok", models=["fake/ok"], **extra)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fake/ok"
    assert post(router, "basic/ok").json()["model"] == "basic/ok"


def test_429_keeps_its_retry_after_and_the_deployment_is_skipped_meanwhile(
    router: Router, fake_upstream: str
) -> None:
    httpx.post(f"{fake_upstream}/_reset")
    r = post(router, "fake/status-429")
    assert assert_error(r, 429)["error"]["code"] == "upstream_rate_limited"
    assert r.headers["retry-after"] == "7"
    # Inside the Retry-After, the upstream is not asked again: 503 until then, streamed or not.
    for stream in (False, True):
        again = post(router, "fake/status-429", stream=stream)
        assert assert_error(again, 503)["error"]["code"] == "service_unavailable"
        assert 5 <= int(again.headers["retry-after"]) <= 7
    assert httpx.get(f"{fake_upstream}/_stats").json()["requests"] == 1


def test_usage_in_streams_is_exact_even_where_the_deployment_counts_none(
    router: Router, fake_upstream: str
) -> None:
    # basic/ok sends no usage in streams: with include_usage, the router asks for a complete
    # answer (which has the upstream's own count) and streams that, rather than guess.
    body = {"prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{router.api}/completions", headers=router.headers(), json={**body, "model": "basic/ok"}
    ) as streamed:
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    sent = httpx.get(f"{fake_upstream}/_stats").json()["last_body"]
    assert "stream" not in sent and "stream_options" not in sent
    assert json.loads(lines[-1][6:])["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert json.loads(lines[0][6:])["choices"][0]["text"]
    # Without include_usage the stream is the upstream's own, and nothing asks it for stream usage.
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=router.headers(),
        json={**body, "model": "basic/ok", "stream_options": None},
    ) as streamed:
        assert streamed.status_code == 200
        streamed.read()
    sent = httpx.get(f"{fake_upstream}/_stats").json()["last_body"]
    assert sent["stream"] is True and "stream_options" not in sent
