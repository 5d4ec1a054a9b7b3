"""Streams: keep-alive comments before the first token, errors after the commit point, and a client
that leaves cancelling the work upstream."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import UPSTREAM_KEYS, Router, serving
from tests.spec import assert_error, validate


def stream_lines(router: Router, body: dict[str, object]) -> tuple[httpx.Response, list[str]]:
    with httpx.stream(
        "POST", f"{router.api}/completions", headers=router.headers(), json=body, timeout=30
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    return r, lines


def leave_after_first_chunk(router: Router, body: dict[str, object], timeout: float = 5) -> None:
    with httpx.stream(
        "POST", f"{router.api}/completions", headers=router.headers(), json=body, timeout=timeout
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break


def test_keepalive_comments_while_waiting_for_the_first_token(router: Router) -> None:
    r, lines = stream_lines(router, {"model": "fake/slow-first", "prompt": "Hi", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[0] == ": llmrouter processing"  # the test server's keepalive is 0.5 s; wait 2 s
    assert lines.count(": llmrouter processing") >= 2
    assert lines[-1] == "data: [DONE]"


def test_error_after_the_first_chunk_is_one_event_then_the_end(router: Router) -> None:
    for model in ("fake/stream-truncated", "fake/stream-error"):
        r, lines = stream_lines(router, {"model": model, "prompt": "Hi", "stream": True})
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[0]["choices"][0]["text"] == "one "
        validate(events[-1], "ErrorResponse")
        assert events[-1]["error"]["type"] == "provider_error"
        assert "data: [DONE]" not in lines


def test_error_before_the_first_chunk_is_an_http_error(router: Router) -> None:
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=router.headers(),
        json={"model": "fake/status-500", "prompt": "Hi", "stream": True},
    ) as r:
        r.read()
    assert_error(r, 502)


def test_stream_chunks_share_id_and_carry_usage_last(router: Router) -> None:
    body = {
        "model": "smollm2",
        "prompt": "Hi",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": 1,
        "temperature": 0,
    }
    r, lines = stream_lines(router, body)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert {e["id"] for e in events} == {r.headers["x-request-id"]}
    assert all(e["object"] == "text_completion" for e in events)
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    text_events = [e for e in events if e["choices"] and e["choices"][0]["text"]]
    assert all(e["choices"][0]["logprobs"]["tokens"] for e in text_events)


def test_client_disconnect_cancels_an_upstream_stream(router: Router, fake_upstream: str) -> None:
    httpx.post(f"{fake_upstream}/_reset")
    leave_after_first_chunk(router, {"model": "fake/slow-stream", "prompt": "Hi", "stream": True})
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if httpx.get(f"{fake_upstream}/_stats").json()["client_gone"] >= 1:
            break
        time.sleep(0.05)
    assert httpx.get(f"{fake_upstream}/_stats").json()["client_gone"] == 1


@pytest.mark.parametrize("prompt_bytes", [1_000, 300_000], ids=["small", "over-64-KiB"])
def test_a_client_that_leaves_cancels_a_non_streamed_upstream_call(
    tmp_path: Path, fake_upstream: str, prompt_bytes: int
) -> None:
    """The upstream's connection is closed soon after the client leaves, whatever the body's size:
    past 64 KiB read at once, uvicorn stops reading the socket until the body is asked for, and
    a client's leaving is only heard once something reads it again."""
    config = f"""
providers:
  fake: {{kind: openai, base_url: "{fake_upstream}/v1", api_key: {UPSTREAM_KEYS["fake"]}}}
models:
  - {{id: m/hang, deployments: [{{provider: fake, model: hang}}]}}
"""
    with serving(tmp_path, config) as router:
        httpx.post(f"{fake_upstream}/_reset")
        body = {"model": "m/hang", "prompt": "x" * prompt_bytes}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{router.api}/completions", headers=router.headers(), json=body, timeout=1.0)
        left = time.monotonic()
        while not httpx.get(f"{fake_upstream}/_stats").json()["closed_at"]:
            assert time.monotonic() - left < 3, "the upstream call goes on for a client that left"
            time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_the_local_model(router: Router, stream: bool) -> None:
    # ~2,000 tokens would keep the model busy for many seconds; a client that leaves must free it.
    long = {
        "model": "smollm2",
        "prompt": "List every number:",
        "max_tokens": 2000,
        "logit_bias": {"2": -100},
        "stream": stream,
    }
    try:
        leave_after_first_chunk(router, long, timeout=0.5)
    except httpx.ReadTimeout:
        assert not stream
    started = time.monotonic()
    r2 = httpx.post(
        f"{router.api}/completions",
        headers=router.headers(),
        json={"model": "smollm2", "prompt": "Hi", "max_tokens": 1},
        timeout=30,
    )
    assert r2.status_code == 200
    assert time.monotonic() - started < 2.5
