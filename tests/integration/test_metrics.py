"""GET /metrics through real router processes: who may read it, what each figure counts after
traffic the test sent, labels only from the configuration, and the sum over `--workers N`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import UPSTREAM_KEYS, Router, drop_redis_namespace, free_port, serving

pytestmark = pytest.mark.timeout(180)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(fake: str, extra: str = "", redis: str | None = None) -> str:
    accounts = f"accounts: {{redis_url: '{redis}', rate_limits_fail_open: true}}\n" if redis else ""
    return f"""
providers:
  fake:
    kind: openai
    base_url: {fake}/v1
    api_key: {UPSTREAM_KEYS["fake"]}
    timeouts: {{connect: 1, first_token: 3, idle: 1, total: 4}}
models:
  - id: m/ok
    aliases: [ok-alias]
    pricing: {{prompt: 1.0, completion: 2.0}}
    deployments: [{{provider: fake, model: ok}}]
  - id: m/fallback
    strategy: ordered
    deployments:
      - {{provider: fake, model: status-503}}
      - {{provider: fake, model: ok}}
  - id: m/down
    deployments: [{{provider: fake, model: status-500}}]
  - id: m/slow
    deployments: [{{provider: fake, model: slow-stream-20}}]
routing: {{seed: 1, health: {{consecutive_failures: 2, cooldown_seconds: 60}}}}
{accounts}{extra}"""


def scrape(router: Router, admin: str, url: str | None = None) -> Samples:
    r = httpx.get(url or f"{router.base}/metrics", headers=auth(admin), timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return parse(r.text)


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.2)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(router: Router, body: dict[str, object], key: str | None = None) -> httpx.Response:
    headers = auth(key or router.key)
    return httpx.post(f"{router.api}/completions", headers=headers, json=body, timeout=30)


def admin_key(router: Router) -> str:
    out = router.cli("keys", "create", "--name", f"root-{uuid.uuid4().hex[:6]}", "--admin")
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[tuple[Router, str]]:
    with serving(tmp_path_factory.mktemp("metrics"), config(fake_upstream)) as router:
        yield router, admin_key(router)


def test_metrics_need_an_admin_key(served: tuple[Router, str]) -> None:
    router, _ = served
    assert httpx.get(f"{router.base}/metrics", timeout=10).status_code == 401
    r = httpx.get(f"{router.base}/metrics", headers=auth(router.key), timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = httpx.get(f"{router.base}/metrics", headers=auth("lr-nope"), timeout=10)
    assert r.status_code == 401


def test_requests_tokens_cost_and_latency_are_counted(served: tuple[Router, str]) -> None:
    router, admin = served
    before = scrape(router, admin)
    prompt_tokens = completion_tokens = 0
    for _ in range(3):
        r = complete(router, {"model": "ok-alias", "prompt": "hi", "max_tokens": 5})
        assert r.status_code == 200, r.text
        prompt_tokens += r.json()["usage"]["prompt_tokens"]
        completion_tokens += r.json()["usage"]["completion_tokens"]
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=auth(router.key),
        json={"model": "m/ok", "prompt": "hi", "stream": True, "max_tokens": 5},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert b"[DONE]" in r.read()
    after = scrape(router, admin)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    plain = {"route": "completions", "model": "m/ok"}
    assert grew("llmrouter_requests_total", **plain, stream="false", status="200") == 3
    assert grew("llmrouter_requests_total", **plain, stream="true", status="200") == 1
    assert grew("llmrouter_request_duration_seconds_count", **plain, stream="false") == 3
    deployment = {"model": "m/ok", "provider": "fake"}
    # The stream's usage comes on top of the three answers'.
    assert grew("llmrouter_tokens_total", **deployment, type="prompt") > prompt_tokens
    assert grew("llmrouter_tokens_total", **deployment, type="completion") > completion_tokens
    streamed_prompt = grew("llmrouter_tokens_total", **deployment, type="prompt") - prompt_tokens
    streamed_completion = (
        grew("llmrouter_tokens_total", **deployment, type="completion") - completion_tokens
    )
    cost = (
        (prompt_tokens + streamed_prompt) * 1.0 + (completion_tokens + streamed_completion) * 2.0
    ) / 1e6
    assert grew("llmrouter_cost_total", **deployment) == pytest.approx(cost)
    assert grew("llmrouter_time_to_first_token_seconds_count", **deployment) == 1
    assert grew("llmrouter_time_per_output_token_seconds_count", **deployment) == 1
    ok = {"provider": "fake", "upstream_model": "ok"}
    assert grew("llmrouter_upstream_attempts_total", **ok, outcome="ok") == 4
    assert grew("llmrouter_upstream_duration_seconds_count", **ok) == 4
    # Every request that reached an upstream has its overhead, the smallest bucket 0.5 ms.
    assert grew("llmrouter_overhead_seconds_count", route="completions") == 4
    assert (
        "llmrouter_overhead_seconds_bucket",
        frozenset({("route", "completions"), ("le", "0.0005")}),
    ) in after
    assert value(after, "llmrouter_in_flight_requests", route="completions") == 0


def test_fallbacks_attempts_and_health(served: tuple[Router, str]) -> None:
    router, admin = served
    before = scrape(router, admin)
    r = complete(router, {"model": "m/fallback", "prompt": "hi", "max_tokens": 5})
    assert r.status_code == 200, r.text
    for _ in range(2):  # two failures in a row eject it (routing.health in the config)
        assert complete(router, {"model": "m/down", "prompt": "hi"}).status_code >= 500
    after = scrape(router, admin)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("llmrouter_fallbacks_total", model="m/fallback") == 1
    failed = {"provider": "fake", "upstream_model": "status-503", "outcome": "upstream_unavailable"}
    assert grew("llmrouter_upstream_attempts_total", **failed) == 1
    down = {"provider": "fake", "upstream_model": "status-500"}
    assert value(after, "llmrouter_deployment_health", **down, state="ejected") == 1
    assert value(after, "llmrouter_deployment_health", **down, state="closed") == 0
    ok = {"provider": "fake", "upstream_model": "ok"}
    assert value(after, "llmrouter_deployment_health", **ok, state="closed") == 1


def test_refusals_by_limit_and_credential(served: tuple[Router, str]) -> None:
    router, admin = served
    limited = router.cli("keys", "create", "--name", f"rpm-{uuid.uuid4().hex[:6]}", "--rpm", "1")
    key = limited.stdout.strip().splitlines()[-1]
    picky = router.cli("keys", "create", "--name", f"m-{uuid.uuid4().hex[:6]}", "--models", "m/down")
    picky_key = picky.stdout.strip().splitlines()[-1]
    before = scrape(router, admin)
    assert complete(router, {"model": "m/ok", "prompt": "hi"}, key).status_code == 200
    assert complete(router, {"model": "m/ok", "prompt": "hi"}, key).status_code == 429
    assert complete(router, {"model": "m/ok", "prompt": "hi"}, picky_key).status_code == 403
    assert complete(router, {"model": "m/ok", "prompt": "hi"}, "lr-wrong").status_code == 401
    r = httpx.post(f"{router.api}/completions", json={"model": "m/ok", "prompt": "x"}, timeout=10)
    assert r.status_code == 401
    after = scrape(router, admin)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("llmrouter_limit_refusals_total", limit="rpm") == 1
    assert grew("llmrouter_limit_refusals_total", limit="models") == 1
    assert grew("llmrouter_auth_failures_total", reason="invalid_api_key") == 1
    assert grew("llmrouter_auth_failures_total", reason="missing_api_key") == 1
    assert (
        grew("llmrouter_requests_total", route="completions", model="m/ok", stream="false", status="429")
        == 1
    )


def test_labels_come_only_from_the_configuration(served: tuple[Router, str]) -> None:
    """Whatever clients send (model names, keys, users, paths), the set of series does not grow
    with it, and none of it appears in a label."""
    router, admin = served
    names = [f"client-model-{uuid.uuid4().hex}" for _ in range(2)]
    complete(router, {"model": names[0], "prompt": "hi", "user": "alice-user"})
    httpx.get(f"{router.base}/no/such/{uuid.uuid4().hex}", timeout=10)
    first = scrape(router, admin)
    keys = [
        router.cli("keys", "create", "--name", f"c-{uuid.uuid4().hex[:6]}").stdout.split()[-1]
        for _ in range(3)
    ]
    for i in range(20):
        body = {"model": f"client-model-{uuid.uuid4().hex}", "prompt": "hi", "user": f"u{i}"}
        assert complete(router, body, keys[i % 3]).status_code == 404
        httpx.get(f"{router.base}/no/such/{uuid.uuid4().hex}", timeout=10)
    text = httpx.get(f"{router.base}/metrics", headers=auth(admin), timeout=10).text
    second = parse(text)
    assert set(second) == set(first)
    assert (
        value(
            second,
            "llmrouter_requests_total",
            route="completions",
            model="other",
            stream="false",
            status="404",
        )
        >= 21
    )
    assert (
        value(second, "llmrouter_requests_total", route="other", model="", stream="false", status="404")
        >= 21
    )
    for secret in (
        *names,
        "client-model-",
        "alice-user",
        "u1",
        *keys,
        "lr-",
        "cmpl-",
        UPSTREAM_KEYS["fake"],
    ):
        assert secret not in text


def test_metrics_can_be_off(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, config(fake_upstream, "metrics: {enabled: false}")) as router:
        r = httpx.get(f"{router.base}/metrics", headers=auth(admin_key(router)), timeout=10)
        assert r.status_code == 404
        assert complete(router, {"model": "m/ok", "prompt": "hi"}).status_code == 200


def test_metrics_on_their_own_address(tmp_path: Path, fake_upstream: str) -> None:
    port = free_port()
    with serving(tmp_path, config(fake_upstream, f"metrics: {{listen: '127.0.0.1:{port}'}}")) as router:
        admin = admin_key(router)
        assert complete(router, {"model": "m/ok", "prompt": "hi"}).status_code == 200
        # Not on the router's address at all, even to an admin...
        assert httpx.get(f"{router.base}/metrics", headers=auth(admin), timeout=10).status_code == 404
        # ...but on its own, without a credential.
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200
        samples = parse(r.text)
        labels = {"route": "completions", "model": "m/ok", "stream": "false", "status": "200"}
        assert value(samples, "llmrouter_requests_total", **labels) == 1


def test_a_taken_metrics_address_fails_the_start_in_one_line(tmp_path: Path, fake_upstream: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = config(fake_upstream, f"metrics: {{listen: '127.0.0.1:{port}'}}")
        with pytest.raises(RuntimeError), serving(tmp_path, text):
            pass
        assert f"cannot serve the metrics on 127.0.0.1:{port}" in (tmp_path / "router.log").read_text()


def test_redis_errors_are_counted(tmp_path: Path, fake_upstream: str) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
    with serving(tmp_path, config(fake_upstream, redis=url)) as router:
        admin = admin_key(router)
        limited = router.cli("keys", "create", "--name", "limited", "--rpm", "100").stdout.split()[-1]
        assert complete(router, {"model": "m/ok", "prompt": "hi"}, limited).status_code == 200
        samples = scrape(router, admin)
        assert value(samples, "llmrouter_redis_errors_total", component="limits") >= 1
        assert value(samples, "llmrouter_redis_errors_total", component="health") >= 1


def test_a_limited_keys_answers_end_as_answered(
    tmp_path: Path, fake_upstream: str, redis_url: str
) -> None:
    """With limits in Redis, a request's usage is settled after its answer has gone (a round trip
    to Redis): it still ends as the 200 it was, in the metrics and the access log, plain and
    streamed, and never as a client that left."""
    namespace = f"t-answered-{uuid.uuid4().hex[:8]}"
    extra = f"accounts: {{redis_url: '{redis_url}', redis_namespace: {namespace}}}\n"
    try:
        with serving(tmp_path, config(fake_upstream, extra)) as router:
            admin = admin_key(router)
            limited = router.cli("keys", "create", "--name", "l", "--rpm", "1000", "--tpm", "10000000")
            key = limited.stdout.split()[-1]
            ids = []
            for stream in (False, True, False, True):
                r = complete(router, {"model": "m/ok", "prompt": "hi", "stream": stream}, key)
                assert r.status_code == 200, r.text
                ids.append(r.headers["x-request-id"])
            eventually(
                lambda: (
                    value(scrape(router, admin), "llmrouter_in_flight_requests", route="completions")
                    == 0
                )
            )
            samples = scrape(router, admin)
            for stream in ("false", "true"):
                labels = {"route": "completions", "model": "m/ok", "stream": stream}
                assert value(samples, "llmrouter_requests_total", **labels, status="200") == 2
                assert value(samples, "llmrouter_requests_total", **labels, status="499") == 0
            lines = [
                json.loads(line)
                for line in (tmp_path / "router.log").read_text().splitlines()
                if line.startswith("{") and '"request_id"' in line
            ]
            logged = {line["request_id"]: line for line in lines if line.get("request_id") in ids}
            assert set(logged) == set(ids)
            assert all(line["status"] == 200 and "error" not in line for line in logged.values()), logged
    finally:
        drop_redis_namespace(namespace)


def test_workers_are_summed_and_the_directory_starts_empty(tmp_path: Path, fake_upstream: str) -> None:
    shared = tmp_path / "prom"
    shared.mkdir()
    # What an earlier run left: a counter file of a process long gone.
    (shared / "counter_999999.db").write_bytes(b"\0" * 64)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    try:
        with serving(tmp_path, config(fake_upstream), "--workers", "2") as router:
            assert not (shared / "counter_999999.db").exists()
            admin = admin_key(router)
            for _ in range(30):  # a new connection each (httpx.post): both workers answer some
                assert (
                    complete(router, {"model": "m/ok", "prompt": "hi", "max_tokens": 2}).status_code
                    == 200
                )
            pids = {p.name.rsplit("_", 1)[-1] for p in shared.glob("counter_*.db")}
            assert len(pids) >= 2  # both workers wrote figures
            labels = {"route": "completions", "model": "m/ok", "stream": "false", "status": "200"}
            # Each worker hands its figures over every second; then, whichever worker is
            # scraped, the sum is the same.
            eventually(lambda: value(scrape(router, admin), "llmrouter_requests_total", **labels) == 30)
            for _ in range(4):
                assert value(scrape(router, admin), "llmrouter_requests_total", **labels) == 30
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def test_workers_on_their_own_address(tmp_path: Path, fake_upstream: str) -> None:
    port = free_port()
    text = config(fake_upstream, f"metrics: {{listen: '127.0.0.1:{port}'}}")
    with serving(tmp_path, text, "--workers", "2") as router:
        for _ in range(10):  # a new connection each (httpx.post)
            assert (
                complete(router, {"model": "m/ok", "prompt": "hi", "max_tokens": 2}).status_code == 200
            )
        labels = {"route": "completions", "model": "m/ok", "stream": "false", "status": "200"}

        def scraped() -> float:
            samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            return value(samples, "llmrouter_requests_total", **labels)

        eventually(lambda: scraped() == 10)


def test_a_reload_brings_its_models_labels_and_deployments(tmp_path: Path, fake_upstream: str) -> None:
    with serving(tmp_path, config(fake_upstream)) as router:
        admin = admin_key(router)
        body = {"model": "m/new", "prompt": "hi", "max_tokens": 2}
        assert complete(router, body).status_code == 404
        extra = "  - id: m/new\n    deployments: [{provider: fake, model: ok-new}]\n"
        router.config.write_text(config(fake_upstream).replace("routing:", extra + "routing:"))
        r = httpx.post(f"{router.api}/admin/reload", headers=auth(admin), timeout=30)
        assert r.status_code == 200, r.text
        assert complete(router, body).status_code == 200
        samples = scrape(router, admin)
        labels = {"route": "completions", "stream": "false"}
        assert value(samples, "llmrouter_requests_total", **labels, model="other", status="404") == 1
        assert value(samples, "llmrouter_requests_total", **labels, model="m/new", status="200") == 1
        new = {"provider": "fake", "upstream_model": "ok-new"}
        assert value(samples, "llmrouter_upstream_attempts_total", **new, outcome="ok") == 1
        assert value(samples, "llmrouter_deployment_health", **new, state="closed") == 1


def test_a_request_every_deployment_failed_counts_its_attempts(served: tuple[Router, str]) -> None:
    router, admin = served
    before = scrape(router, admin)
    r = complete(router, {"model": "m/down", "prompt": "hi"})
    assert r.status_code >= 500
    tried = r.headers["x-llmrouter-attempts"].count("fake/status-500")
    after = scrape(router, admin)
    down = {"provider": "fake", "upstream_model": "status-500"}
    counted = sum(
        v - value(before, name, **dict(labels))
        for (name, labels), v in after.items()
        if name == "llmrouter_upstream_attempts_total" and down.items() <= dict(labels).items()
    )
    assert tried >= 1 and counted == tried


def test_a_stream_the_client_left_is_a_499(served: tuple[Router, str]) -> None:
    router, admin = served
    labels = {"route": "completions", "model": "m/slow", "stream": "true"}
    before = scrape(router, admin)
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=auth(router.key),
        json={"model": "m/slow", "prompt": "hi", "stream": True},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the stream has begun; then the client leaves
    eventually(
        lambda: value(scrape(router, admin), "llmrouter_in_flight_requests", route="completions") == 0
    )
    after = scrape(router, admin)
    grew = value(after, "llmrouter_requests_total", **labels, status="499") - value(
        before, "llmrouter_requests_total", **labels, status="499"
    )
    assert grew == 1
    assert value(after, "llmrouter_requests_total", **labels, status="200") == value(
        before, "llmrouter_requests_total", **labels, status="200"
    )


def test_a_deployment_a_reload_removed_leaves_the_health_figures(
    tmp_path: Path, fake_upstream: str
) -> None:
    with serving(tmp_path, config(fake_upstream)) as router:
        admin = admin_key(router)
        for _ in range(2):
            complete(router, {"model": "m/down", "prompt": "hi"})
        down = {"provider": "fake", "upstream_model": "status-500"}
        assert value(scrape(router, admin), "llmrouter_deployment_health", **down, state="ejected") == 1
        text = config(fake_upstream).replace(
            "  - id: m/down\n    deployments: [{provider: fake, model: status-500}]\n", ""
        )
        assert "status-500" not in text
        router.config.write_text(text)
        r = httpx.post(f"{router.api}/admin/reload", headers=auth(admin), timeout=30)
        assert r.status_code == 200 and r.json()["data"]["models"]["removed"] == ["m/down"]
        samples = scrape(router, admin)
        assert not [
            k
            for k in samples
            if k[0] == "llmrouter_deployment_health" and ("upstream_model", "status-500") in k[1]
        ]


def test_a_dead_workers_gauges_are_not_summed(tmp_path: Path, fake_upstream: str) -> None:
    port = free_port()
    text = config(fake_upstream, f"metrics: {{listen: '127.0.0.1:{port}'}}")
    with serving(tmp_path, text, "--workers", "2") as router:
        ok = {"provider": "fake", "upstream_model": "ok", "state": "closed"}

        def closed() -> float:
            samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            return value(samples, "llmrouter_deployment_health", **ok)

        eventually(lambda: closed() == 2)  # two workers see it closed
        workers = subprocess.run(["pgrep", "-P", str(router.proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in workers.stdout.split()]
        assert len(pids) >= 2
        os.kill(pids[0], signal.SIGKILL)  # the supervisor starts another in its place
        time.sleep(3)
        eventually(lambda: closed() == 2, seconds=15)
        for _ in range(3):
            assert closed() == 2


def test_a_metrics_folder_holding_other_files_is_refused(
    tmp_path: Path, fake_upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "prom"
    shared.mkdir()
    (shared / "important.db").write_bytes(b"the operator's")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    with pytest.raises(RuntimeError), serving(tmp_path, config(fake_upstream), "--workers", "2"):
        pass
    assert (shared / "important.db").read_bytes() == b"the operator's"  # left alone
    assert "holds important.db, which is not a metrics file" in (tmp_path / "router.log").read_text()
