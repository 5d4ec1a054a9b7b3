"""The config reloaded without a restart, in a real router process: SIGHUP and
`POST /api/v1/admin/reload` change models, deployments, strategies, limits and provider keys for
new requests, while requests and streams in flight finish on what they started with; a file that
does not load is refused and the running config stays; under load no request fails; with
`--workers 2` every worker reloads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest

from tests.conftest import BIN, Router, fake_server, free_port, serving, start_router, stop, wait_http

ISSUER = "reload-tests"
JWT_SECRET = "reload-tests-secret-0123456789-abcdef"
TIMEOUTS = "timeouts: {connect: 1, first_token: 10, idle: 5, total: 30}"


@pytest.fixture(scope="module")
def up_a() -> Iterator[str]:
    yield from fake_server("upstream.py")


@pytest.fixture(scope="module")
def up_b() -> Iterator[str]:
    yield from fake_server("upstream.py")


def config(
    upstream: str,
    models: dict[str, str],
    *,
    key: str = "key-one",
    rpm: int = 1,
    extra_providers: str = "",
    extra: str = "",
) -> str:
    """Provider `up` at `upstream`, one model per entry (id: its deployments' flow YAML), a JWT
    issuer whose default policy allows `rpm` requests a minute."""
    listed = "".join(f"  - {{id: {m}, {spec}}}\n" for m, spec in models.items())
    return f"""providers:
  up: {{kind: openai, base_url: "{upstream}/v1", api_key: {key}, {TIMEOUTS}}}
{extra_providers}models:
{listed}routing: {{max_attempts: 1, retry_budget: {{min_per_second: 1000}}}}
accounts:
  policies: {{p: {{rpm: {rpm}}}}}
  jwt:
    - {{issuer: {ISSUER}, audience: llmrouter, algorithms: [HS256], secret: {JWT_SECRET},
        default_policy: p}}
{extra}"""


def one(upstream_model: str) -> str:
    return f"deployments: [{{provider: up, model: {upstream_model}}}]"


def admin_key(router: Router) -> str:
    return router.cli("keys", "create", "--name", "root", "--admin").stdout.strip().splitlines()[-1]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def complete(router: Router, model: str, token: str | None = None, **extra: Any) -> httpx.Response:
    headers = auth(token) if token else router.headers()
    body = {"model": model, "prompt": "hi", "max_tokens": 5, **extra}
    return httpx.post(f"{router.api}/completions", headers=headers, json=body, timeout=60)


def upstream_model(response: httpx.Response) -> str:
    """The fake's `ok` answer is the body it got: which upstream model it was asked for."""
    return str(json.loads(response.json()["choices"][0]["text"])["model"])


def stats(upstream: str) -> dict[str, Any]:
    return dict(httpx.get(f"{upstream}/_stats", timeout=5).json())


def reloads(router: Router) -> list[dict[str, Any]]:
    """The log's line of each reload, done or refused, in order."""
    found = []
    for line in router.log.read_text().splitlines():
        if '"msg":"config reloaded' in line or '"msg":"config not reloaded' in line:
            found.append(json.loads(line))
    return found


def sighup(router: Router) -> dict[str, Any]:
    """SIGHUP the router; its log's line of the reload."""
    before = len(reloads(router))
    os.kill(router.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = reloads(router)
        if len(lines) > before:
            assert router.proc.poll() is None
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError("no reload in the log after SIGHUP")


def post_reload(router: Router, admin: str) -> httpx.Response:
    return httpx.post(f"{router.api}/admin/reload", headers=auth(admin), timeout=60)


def reload_ok(router: Router, how: str, admin: str) -> None:
    if how == "sighup":
        line = sighup(router)
        assert line["msg"].startswith("config reloaded"), line
    else:
        r = post_reload(router, admin)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["status"] in ("reloaded", "unchanged"), r.text


def reload_refused(router: Router, how: str, admin: str) -> str:
    """The error of a refused reload: the POST's message, or SIGHUP's log line."""
    if how == "sighup":
        line = sighup(router)
        assert line["level"] == "error" and line["msg"].startswith("config not reloaded: "), line
        return str(line["msg"])
    r = post_reload(router, admin)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert error["code"] == "invalid_config" and error["type"] == "invalid_request_error"
    return str(error["message"])


def jwt_token() -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "llmrouter", "sub": f"u-{uuid.uuid4().hex[:6]}", "exp": now + 300}
    return pyjwt.encode(claims, JWT_SECRET, algorithm="HS256")


# -- what a reload changes -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sighup", "post"])
def test_a_reload_changes_models_deployments_keys_strategies_and_limits(
    tmp_path: Path, up_a: str, up_b: str, how: str
) -> None:
    tag = uuid.uuid4().hex[:6]
    ordered = (
        "strategy: ordered, deployments: [{{provider: up, model: {}, priority: {}}}, "
        "{{provider: up, model: {}, priority: {}}}]"
    )
    before = {
        "m/keep": one(f"keep-{tag}"),
        "m/gone": one(f"gone-{tag}"),
        "m/order": ordered.format(f"first-{tag}", 0, f"second-{tag}", 1),
    }
    with serving(tmp_path, config(up_a, before)) as router:
        admin = admin_key(router)
        token = jwt_token()
        assert complete(router, "m/keep", token).status_code == 200
        assert complete(router, "m/keep", token).status_code == 429  # the policy's rpm: 1
        assert f"up/first-{tag} ok" in complete(router, "m/order").headers["x-llmrouter-attempts"]
        assert stats(up_a)["last_headers"]["Authorization"] == "Bearer key-one"

        after = {
            "m/keep": one(f"keep-{tag}"),
            "m/new": one(f"new-{tag}"),
            "m/order": ordered.format(f"first-{tag}", 1, f"second-{tag}", 0),
        }
        router.config.write_text(config(up_b, after, key="key-two", rpm=1000))
        hits_a = stats(up_a)["hits"].get(f"keep-{tag}", 0)
        reload_ok(router, how, admin)

        listed = {
            m["id"]
            for m in httpx.get(f"{router.base}/v1/models", headers=router.headers(), timeout=10).json()[
                "data"
            ]
        }
        assert {"m/keep", "m/new", "m/order"} <= listed and "m/gone" not in listed
        new = complete(router, "m/new")
        assert new.status_code == 200 and upstream_model(new) == f"new-{tag}"
        gone = complete(router, "m/gone")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        # The deployment's upstream moved to B, with the new key.
        assert complete(router, "m/keep").status_code == 200
        b = stats(up_b)
        assert b["hits"].get(f"keep-{tag}") == 1
        assert stats(up_a)["hits"].get(f"keep-{tag}", 0) == hits_a
        assert b["last_headers"]["Authorization"] == "Bearer key-two"
        # The strategy's order and the JWT policy's limit are the new ones.
        assert f"up/second-{tag} ok" in complete(router, "m/order").headers["x-llmrouter-attempts"]
        for _ in range(3):
            assert complete(router, "m/keep", token).status_code == 200


def test_reloading_needs_an_admin_credential(tmp_path: Path, up_a: str) -> None:
    with serving(tmp_path, config(up_a, {"m/keep": one("ok")})) as router:
        url = f"{router.api}/admin/reload"
        missing = httpx.post(url, timeout=10)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        user = httpx.post(url, headers=router.headers(), timeout=10)  # a key, not an admin's
        assert user.status_code == 403 and user.json()["error"]["code"] == "admin_required"
        jwt = httpx.post(url, headers=auth(jwt_token()), timeout=10)
        assert jwt.status_code == 403
        assert httpx.get(url, headers=auth(admin_key(router)), timeout=10).status_code == 405
        assert reloads(router) == []


# -- in flight -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sighup", "post"])
def test_requests_in_flight_finish_on_the_config_they_started_with(
    tmp_path: Path, up_a: str, up_b: str, how: str
) -> None:
    """A reload removes the provider and the models of a stream and a slow request under way:
    both finish whole, from the old deployment, and the stream's ledger record says so."""
    old = f"""  old: {{kind: openai, base_url: "{up_a}/v1", {TIMEOUTS}}}
"""
    models = {
        "m/keep": one("ok"),
        "m/stream": "deployments: [{provider: old, model: slow-stream-10}]",
        "m/slow": "deployments: [{provider: old, model: slow-ok-2500}]",
    }
    with serving(tmp_path, config(up_b, models, rpm=1000, extra_providers=old)) as router:
        admin = admin_key(router)
        body = {"model": "m/stream", "prompt": "hi", "stream": True, "max_tokens": 50}
        slow: dict[str, httpx.Response] = {}

        def slow_request() -> None:
            slow["r"] = complete(router, "m/slow")

        worker = threading.Thread(target=slow_request)
        with httpx.stream(
            "POST", f"{router.api}/completions", headers=router.headers(), json=body, timeout=60
        ) as stream:
            assert stream.status_code == 200
            request_id = stream.headers["x-request-id"]
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            hits = stats(up_a)["hits"].get("slow-ok-2500", 0)
            worker.start()
            deadline = time.monotonic() + 10
            while stats(up_a)["hits"].get("slow-ok-2500", 0) == hits:
                assert time.monotonic() < deadline, "the slow request did not reach its upstream"
                time.sleep(0.05)

            router.config.write_text(config(up_b, {"m/keep": one("ok")}, rpm=1000))
            reload_ok(router, how, admin)
            assert complete(router, "m/stream").status_code == 404
            assert complete(router, "m/slow").status_code == 404
            assert complete(router, "m/keep").status_code == 200

            rest = [line for line in lines if line.startswith("data: ")]
        worker.join(30)

        chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]"
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == "".join(f"t{i} " for i in range(10))
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] == "stop"
        assert slow["r"].status_code == 200, slow["r"].text
        assert upstream_model(slow["r"]) == "slow-ok-2500"
        assert "old/slow-ok-2500 ok" in slow["r"].headers["x-llmrouter-attempts"]

        record = httpx.get(
            f"{router.api}/generation", params={"id": request_id}, headers=auth(admin), timeout=10
        ).json()["data"]
        assert record["status"] == 200 and record["stream"] is True
        assert record["provider"] == "old" and record["model_requested"] == "m/stream"
        assert record["finish_reason"] == "stop" and record["completion_tokens"] == 3


# -- refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sighup", "post"])
def test_a_config_that_does_not_load_is_refused_and_the_running_one_stays(
    tmp_path: Path, up_a: str, how: str
) -> None:
    good = {"m/keep": one("ok")}
    with serving(tmp_path, config(up_a, good)) as router:
        admin = admin_key(router)
        junk = tmp_path / "junk.gguf"
        junk.write_bytes(b"GGUF, or not" * 100)
        wanted = {**good, "m/new": one("ok")}
        fixed = config(up_a, wanted)
        broken = {
            "not valid YAML": fixed.replace("models:\n", "models: [\n"),
            "models[1].bogus (line 5): unknown key": fixed.replace(
                "{id: m/new,", "{id: m/new, bogus: 1,"
            ),
            "environment variable RELOAD_TEST_NOT_SET is not set": fixed.replace(
                "api_key: key-one", "api_key: ${RELOAD_TEST_NOT_SET}"
            ),
            "home, server.port cannot change without a restart": fixed
            + f"server: {{port: {free_port()}}}\nhome: {tmp_path / 'elsewhere'}\n",
            "deployment local/junk did not start": config(
                up_a,
                {
                    **wanted,
                    "m/junk": f"deployments: [{{provider: local, model: junk, model_path: {junk}}}]",
                },
                extra_providers="  local: {kind: llamacpp}\n",
            ),
        }
        for expected, text in broken.items():
            router.config.write_text(text)
            message = reload_refused(router, how, admin)
            assert expected in message, message
            assert complete(router, "m/keep").status_code == 200
            assert complete(router, "m/new").status_code == 404
        router.config.write_text(fixed)
        reload_ok(router, how, admin)
        assert complete(router, "m/new").status_code == 200
        assert router.proc.poll() is None


# -- under load ----------------------------------------------------------------------------------


def test_no_request_fails_while_the_config_is_reloaded_under_load(
    tmp_path: Path, up_a: str, up_b: str
) -> None:
    """Clients send requests continuously, on kept-alive connections, while six reloads (by
    POST and SIGHUP in turn) each move the model to another upstream model, the provider
    rebuilt each time (its base URL and key change): every answer is a 200 from one of the
    configs, and every request sent after the last reload is answered by the last one."""
    tag = uuid.uuid4().hex[:6]

    def version(i: int) -> str:
        upstream = up_b if i % 2 else up_a
        return config(upstream, {"m/load": one(f"gen-{i}-{tag}")}, key=f"key-{i}", rpm=10**6)

    with serving(tmp_path, version(0)) as router:
        admin = admin_key(router)
        done = threading.Event()
        answers: list[tuple[int, str]] = []
        failures: list[str] = []

        def client() -> None:
            with httpx.Client(headers=router.headers(), timeout=30) as http:
                for _ in range(2000):  # bounded, whatever happens
                    if done.is_set():
                        return
                    sent = time.monotonic_ns()  # a request in flight keeps its config
                    try:
                        r = http.post(
                            f"{router.api}/completions",
                            json={"model": "m/load", "prompt": "hi", "max_tokens": 5},
                        )
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        answers.append((sent, upstream_model(r)))

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        try:
            for i in range(1, 7):
                time.sleep(0.4)
                router.config.write_text(version(i))
                reload_ok(router, "post" if i % 2 else "sighup", admin)
            last = time.monotonic_ns()
            time.sleep(0.5)
        finally:
            done.set()
            for thread in clients:
                thread.join(60)
        assert not failures, failures[:5]
        seen = {model for _, model in answers}
        assert seen <= {f"gen-{i}-{tag}" for i in range(7)}, seen
        assert len(seen) >= 4, seen  # the clients ran across the reloads
        assert {model for at, model in answers if at > last} == {f"gen-6-{tag}"}


# -- workers -------------------------------------------------------------------------------------


def _served_by_all(router: Router, model: str, *, tries: int = 20) -> bool:
    """`tries` requests on fresh connections (spread over the workers) all answered."""
    for _ in range(tries):
        r = httpx.post(
            f"{router.api}/completions",
            headers={**router.headers(), "Connection": "close"},
            json={"model": model, "prompt": "hi", "max_tokens": 5},
            timeout=30,
        )
        if r.status_code != 200:
            return False
    return True


def _wait_served_by_all(router: Router, model: str) -> None:
    deadline = time.monotonic() + 30
    while not _served_by_all(router, model):
        assert time.monotonic() < deadline, f"{model} is not served by every worker"
        time.sleep(0.2)


def _workers(router: Router) -> set[int]:
    pid = router.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()}


def _reloaded_pids(router: Router) -> list[int]:
    return [line["pid"] for line in reloads(router) if line["msg"].startswith("config reloaded")]


def test_every_worker_reloads(tmp_path: Path, up_a: str) -> None:
    router = start_router(tmp_path, config(up_a, {"m/one": one("ok")}), "--workers", "2")
    try:
        workers = _workers(router)
        assert len(workers) == 2
        admin = admin_key(router)

        # SIGHUP to the supervisor: each worker reloads (none restarted).
        router.config.write_text(config(up_a, {"m/one": one("ok"), "m/two": one("ok")}))
        os.kill(router.proc.pid, signal.SIGHUP)
        _wait_served_by_all(router, "m/two")
        deadline = time.monotonic() + 10
        while len(set(_reloaded_pids(router))) < 2:
            assert time.monotonic() < deadline, _reloaded_pids(router)
            time.sleep(0.1)
        assert set(_reloaded_pids(router)) == workers

        # A POST lands on one worker, which checks the file and has the supervisor signal all.
        router.config.write_text(config(up_a, {"m/three": one("ok")}))
        r = post_reload(router, admin)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["status"] == "signalled"
        assert data["models"] == {"added": ["m/three"], "removed": ["m/one", "m/two"], "changed": []}
        _wait_served_by_all(router, "m/three")
        deadline = time.monotonic() + 10
        while len(_reloaded_pids(router)) < 4:
            assert time.monotonic() < deadline, _reloaded_pids(router)
            time.sleep(0.1)
        assert sorted(_reloaded_pids(router)) == sorted([*workers, *workers])

        # A broken file is refused by the worker the POST lands on, and no worker reloads it.
        router.config.write_text("models: [\n")
        r = post_reload(router, admin)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_config"
        assert _served_by_all(router, "m/three")
        assert _workers(router) == workers  # reloaded, never restarted
    finally:
        stop(router.proc)


def test_a_sighup_never_kills_the_server(tmp_path: Path, up_a: str) -> None:
    """Without a config file there is nothing to reload, and while it starts there is no reload
    yet: either way a SIGHUP (logrotate, `systemctl reload`) is told, never fatal."""
    with serving(tmp_path / "embedded", None) as router:
        router.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert router.proc.poll() is None
        assert httpx.get(f"{router.base}/health", timeout=5).status_code == 200
        assert "nothing to reload" in router.log.read_text()
    (tmp_path / "early").mkdir()
    text = config(up_a, {"up/ok": "deployments: [{provider: up, model: ok}]"})
    path = tmp_path / "early" / "config.yaml"
    path.write_text(text)
    port = free_port()
    env = {**os.environ, "LLMROUTER_HOME": str(tmp_path / "early" / "home")}
    proc = subprocess.Popen(
        [str(BIN / "llmrouter"), "serve", "--config", str(path), "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # From the moment `serve` runs (its first step ignores SIGHUP), through the start.
        status = Path(f"/proc/{proc.pid}/status")
        while not int(re.search(r"SigIgn:\s*(\w+)", status.read_text())[1], 16) & 1:
            assert proc.poll() is None
            time.sleep(0.01)
        for _ in range(5):
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        assert proc.poll() is None
    finally:
        stop(proc)
