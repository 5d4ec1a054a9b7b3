"""Accounts end to end, through a real router process: keys and their limits, JWTs, the admin
API's authorisation, `GET /api/v1/key`, the ledger and `GET /api/v1/generation`, `llmrouter usage`.

The whole module runs twice: on SQLite with in-process limits, and on PostgreSQL with Redis.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt as pyjwt
import pytest

from llmrouter.accounts.keys import KEY_PATTERN
from tests.conftest import PG_URL, Router, drop_redis_namespace, drop_schema, start_router, stop

JWT_SECRET = "a-test-secret-of-at-least-32-bytes!!"
ISSUER = "https://idp.test"
# Each answer from the fake costs 3 * 0.1 + 2 * 0.2 = 0.7 (usage: 3 prompt, 2 completion tokens).
PRICING = "{prompt: 100000, completion: 200000}"
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def config(fake: str, backend: str, schema: str | None, redis: str | None) -> str:
    database = (
        f"  database_url: {PG_URL}\n  database_schema: {schema}\n" if backend == "postgres" else ""
    )
    redis_line = f"  redis_url: {redis}\n  redis_namespace: {schema}\n" if redis else ""
    # The fake takes chat requests through a chat template (the same answers, the same costs).
    chat = f"chat_template: {json.dumps(TEMPLATE)}"
    return f"""providers:
  fake: {{kind: openai, base_url: {fake}/v1, timeouts: {{first_token: 5, total: 10}}}}
models:
  - {{id: fake/ok, pricing: {PRICING}, deployments: [{{provider: fake, model: ok, {chat}}}]}}
  - {{id: fake/other, deployments: [{{provider: fake, model: ok, {chat}}}]}}
  - {{id: fake/slow, deployments: [{{provider: fake, model: slow-ok-1500, {chat}}}]}}
  - id: fake/slow-priced
    pricing: {PRICING}
    deployments: [{{provider: fake, model: slow-ok-1500, {chat}}}]
  - {{id: fake/status-500, deployments: [{{provider: fake, model: status-500, {chat}}}]}}
  - {{id: fake/hang, deployments: [{{provider: fake, model: hang}}]}}
  - id: fake/truncated
    pricing: {PRICING}
    deployments: [{{provider: fake, model: stream-truncated}}]
routing: {{max_attempts: 1, retry_budget: {{min_per_second: 1000}}}}
accounts:
{database}{redis_line}  policies:
    small: {{rpm: 2, models: [fake/ok]}}
  jwt:
    - issuer: {ISSUER}
      audience: llmrouter
      algorithms: [HS256]
      secret: {JWT_SECRET}
      leeway_seconds: 5
"""


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def router(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_upstream: str
) -> Iterator[Router]:
    backend = request.param
    schema = redis = None
    if backend == "postgres":
        from tests.conftest import REDIS_URL, _reachable, need_service

        need_service("PostgreSQL at 127.0.0.1:5432", _reachable("127.0.0.1", 5432))
        need_service("Redis at 127.0.0.1:6379", _reachable("127.0.0.1", 6379))
        schema, redis = f"t_{uuid.uuid4().hex[:16]}", REDIS_URL
    tmp = tmp_path_factory.mktemp(f"accounts-{backend}")
    r = start_router(tmp, config(fake_upstream, backend, schema, redis))
    try:
        yield r
    finally:
        stop(r.proc)
        if schema is not None:
            drop_schema(schema)
            drop_redis_namespace(schema)


@pytest.fixture(scope="module")
def admin(router: Router) -> str:
    out = router.cli("keys", "create", "--name", "root", "--admin")
    return out.stdout.strip().splitlines()[-1]


def new_key(router: Router, *options: str) -> str:
    name = f"k-{uuid.uuid4().hex[:8]}"
    return router.cli("keys", "create", "--name", name, *options).stdout.strip().splitlines()[-1]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def complete(router: Router, token: str, model: str = "fake/ok", **body: Any) -> httpx.Response:
    return httpx.post(
        f"{router.api}/completions",
        headers=auth(token),
        json={"model": model, "prompt": "hi", **body},
        timeout=30,
    )


def chat(router: Router, token: str, model: str = "fake/ok", **body: Any) -> httpx.Response:
    """The same request on the chat endpoint: the same road, the same limits and ledger."""
    return httpx.post(
        f"{router.api}/chat/completions",
        headers=auth(token),
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
        timeout=30,
    )


def error_of(response: httpx.Response) -> dict[str, str]:
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "type"}
    return error  # type: ignore[no-any-return]


def token(**claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "llmrouter", "sub": "user-1", "exp": now + 300, **claims}
    return pyjwt.encode(payload, JWT_SECRET, algorithm="HS256")


# -- admin API ------------------------------------------------------------------------------------

ADMIN_ENDPOINTS = [
    ("GET", "/api/v1/keys", None),
    ("POST", "/api/v1/keys", {"name": "made-by-matrix"}),
    ("GET", "/api/v1/keys/{id}", None),
    ("POST", "/api/v1/keys/{id}/rotate", None),
    ("PATCH", "/api/v1/keys/{id}", {"rpm": 5}),
    ("DELETE", "/api/v1/keys/{id}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS)
def test_admin_api_authorisation_matrix(
    router: Router, admin: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    target_key = new_key(router)
    match = KEY_PATTERN.match(target_key)
    assert match is not None
    url = router.base + path.format(id=match.group("id"))
    if body is not None and "name" in body:
        body = {**body, "name": f"{body['name']}-{uuid.uuid4().hex[:6]}"}
    callers = {
        "nobody": ({}, 401),
        "made-up key": (auth("lr-AAAAAAAAAAAA_" + "B" * 38), 401),
        "garbage": (auth("not a key"), 401),
        "normal key": (auth(new_key(router)), 403),
        "jwt": (auth(token()), 403),
        "expired jwt": (auth(token(exp=int(time.time()) - 600)), 401),
    }
    for who, (headers, status) in callers.items():
        r = httpx.request(method, url, headers=headers, json=body, timeout=10)
        assert r.status_code == status, (who, r.text)
        assert error_of(r)["type"] in ("authentication_error", "permission_error")
    r = httpx.request(method, url, headers=auth(admin), json=body, timeout=10)
    assert r.status_code in (200, 201), r.text
    assert "key" not in r.json() or KEY_PATTERN.match(r.json()["key"])


def test_admin_api_edits_a_keys_limits(router: Router, admin: str) -> None:
    r = httpx.post(
        f"{router.api}/keys",
        headers=auth(admin),
        json={"name": f"e-{uuid.uuid4().hex[:6]}", "tpm": 10**6},
        timeout=10,
    )
    key_id, secret = r.json()["data"]["id"], r.json()["key"]
    url = f"{router.api}/keys/{key_id}"
    r = httpx.patch(url, headers=auth(admin), json={"rpm": 1, "models": ["fake/ok"]}, timeout=10)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["limits"]["rpm"] == 1 and data["limits"]["tpm"] == 10**6  # left out: kept
    assert data["models"] == ["fake/ok"]
    assert complete(router, secret).status_code == 200
    assert complete(router, secret).status_code == 429  # in force at once
    assert httpx.get(url, headers=auth(admin), timeout=10).json()["data"]["limits"]["rpm"] == 1
    r = httpx.patch(url, headers=auth(admin), json={"rpm": None, "models": None}, timeout=10)
    assert r.json()["data"]["limits"]["rpm"] is None and r.json()["data"]["models"] is None
    for body, param in (
        ({"rpm": -1}, "rpm"),
        ({"models": ["no/such"]}, "models[0]"),
        ({"name": "x"}, "name"),
    ):
        r = httpx.patch(url, headers=auth(admin), json=body, timeout=10)
        assert r.status_code == 400 and error_of(r)["param"] == param, (body, r.text)
    r = httpx.patch(
        url, headers={**auth(admin), "Content-Type": "application/json"}, content=b"{", timeout=10
    )
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    httpx.delete(url, headers=auth(admin), timeout=10)
    assert httpx.patch(url, headers=auth(admin), json={"rpm": 3}, timeout=10).status_code == 404


def test_admin_api_manages_keys(router: Router, admin: str) -> None:
    name = f"svc-{uuid.uuid4().hex[:6]}"
    spec = {"name": name, "owner": "team-a", "rpm": 7, "credit_limit": 2.5, "reset": "daily"}
    r = httpx.post(f"{router.api}/keys", headers=auth(admin), json=spec, timeout=10)
    assert r.status_code == 201, r.text
    created, secret = r.json()["data"], r.json()["key"]
    assert (
        created["limits"]["rpm"] == 7 and created["owner"] == "team-a" and created["status"] == "active"
    )
    assert complete(router, secret).status_code == 200
    listed = httpx.get(f"{router.api}/keys", headers=auth(admin), timeout=10).json()["data"]
    assert next(k for k in listed if k["id"] == created["id"])["name"] == name
    assert secret not in json.dumps(listed)
    rotated = httpx.post(f"{router.api}/keys/{created['id']}/rotate", headers=auth(admin), timeout=10)
    new_secret = rotated.json()["key"]
    assert rotated.json()["data"]["id"] == created["id"] and new_secret != secret
    assert complete(router, secret).status_code == 401
    assert complete(router, new_secret).status_code == 200
    gone = httpx.delete(f"{router.api}/keys/{created['id']}", headers=auth(admin), timeout=10)
    assert gone.json()["data"]["status"] == "revoked"
    r = complete(router, new_secret)
    assert r.status_code == 401 and error_of(r)["code"] == "revoked_api_key"
    # Gone from its URL, as after any DELETE (schemathesis' use_after_free); listed with all=true.
    after = httpx.get(f"{router.api}/keys/{created['id']}", headers=auth(admin), timeout=10)
    assert after.status_code == 404 and error_of(after)["param"] == "id"
    everything = httpx.get(f"{router.api}/keys?all=true", headers=auth(admin), timeout=10).json()
    assert next(k for k in everything["data"] if k["id"] == created["id"])["status"] == "revoked"
    missing = httpx.get(f"{router.api}/keys/nope", headers=auth(admin), timeout=10)
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"


def test_a_taken_key_name_is_409_until_its_key_is_revoked(router: Router, admin: str) -> None:
    name = {"name": f"twice-{uuid.uuid4().hex[:6]}"}
    first = httpx.post(f"{router.api}/keys", headers=auth(admin), json=name, timeout=10)
    assert first.status_code == 201, first.text
    again = httpx.post(f"{router.api}/keys", headers=auth(admin), json=name, timeout=10)
    assert again.status_code == 409, again.text
    assert error_of(again) == {
        "code": "conflict",
        "message": error_of(again)["message"],
        "param": "name",
        "type": "invalid_request_error",
    }
    assert name["name"] in error_of(again)["message"]
    key_id = first.json()["data"]["id"]
    assert httpx.delete(f"{router.api}/keys/{key_id}", headers=auth(admin)).status_code == 200
    assert httpx.post(f"{router.api}/keys", headers=auth(admin), json=name).status_code == 201


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "colour": "red"}, "colour"),  # the unknown field named
        ({"name": "x", "rpm": "many"}, "rpm"),
        ({"name": "x", "rpm": -1}, "rpm"),
        ({"name": "x", "reset": "hourly"}, "reset"),
        ({"name": "nul\u0000"}, "name"),
        ({"name": "x", "models": ["no/such-model"]}, "models[0]"),
        ({}, ""),
    ],
)
def test_admin_api_refuses_bad_bodies_in_the_error_shape(
    router: Router, admin: str, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{router.api}/keys", headers=auth(admin), json=body, timeout=10)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_hostile_names_and_metadata_are_kept_intact(router: Router, admin: str) -> None:
    name = f"x'); DROP TABLE api_keys; -- \"\\\t\n\x1b[31m ☃ {uuid.uuid4().hex[:6]} " + "n" * 20000
    r = httpx.post(f"{router.api}/keys", headers=auth(admin), json={"name": name}, timeout=10)
    assert r.status_code == 201, r.text
    secret, key_id = r.json()["key"], r.json()["data"]["id"]
    assert httpx.get(f"{router.api}/keys/{key_id}", headers=auth(admin)).json()["data"]["name"] == name
    metadata = {"q": "'; DELETE FROM ledger; --", "ctl": "\x00\x01\n\t", "\"k'": "x" * 512}
    user = "u\x00'\" ; DROP TABLE ledger; --"
    answer = complete(router, secret, metadata=metadata, user=user)
    assert answer.status_code == 200
    record = generation(router, secret, answer.json()["id"])
    assert record["metadata"] == metadata and record["user"] == user
    assert httpx.get(f"{router.api}/keys", headers=auth(admin)).status_code == 200  # tables intact


# -- the caller's view, limits and credits --------------------------------------------------------


def generation(router: Router, token: str, request_id: str) -> dict[str, Any]:
    r = httpx.get(f"{router.api}/generation", params={"id": request_id}, headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def test_key_view_limits_usage_and_remaining_credit(router: Router) -> None:
    secret = new_key(router, "--rpm", "50", "--credit-limit", "10", "--reset", "monthly")
    assert complete(router, secret).status_code == 200
    data = httpx.get(f"{router.api}/key", headers=auth(secret)).json()["data"]
    assert data["kind"] == "key" and data["limits"]["rpm"] == 50 and data["limits"]["reset"] == "monthly"
    assert data["usage"]["requests"] == 1
    assert data["spent"] == pytest.approx(0.7) and data["limit_remaining"] == pytest.approx(9.3)


def test_requests_per_minute_gives_429_with_headers(router: Router) -> None:
    secret = new_key(router, "--rpm", "3")
    statuses = []
    for _ in range(3):
        r = complete(router, secret)
        statuses.append(r.status_code)
        assert r.headers["x-ratelimit-limit"] == "3"
    assert statuses == [200, 200, 200]
    assert r.headers["x-ratelimit-remaining"] == "0"
    refused = complete(router, secret)
    assert refused.status_code == 429
    assert error_of(refused)["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert (
        refused.headers["x-ratelimit-limit"] == "3" and refused.headers["x-ratelimit-remaining"] == "0"
    )
    assert 1 <= int(refused.headers["x-ratelimit-reset"]) <= 60


def test_credit_limit_gives_402(router: Router) -> None:
    secret = new_key(router, "--credit-limit", "1.0")
    assert complete(router, secret).status_code == 200  # spent 0.7 of 1.0
    assert complete(router, secret).status_code == 200  # may overspend by its own cost: 1.4
    refused = complete(router, secret)
    assert refused.status_code == 402, refused.text
    error = error_of(refused)
    assert error["type"] == "insufficient_credits" and error["code"] == "credit_limit_exceeded"
    assert complete(router, secret, model="fake/other").status_code == 402  # free, but spent


def test_credit_is_held_while_a_request_runs(router: Router) -> None:
    secret = new_key(router, "--credit-limit", "1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(complete, router, secret, "fake/slow-priced")  # may cost 3.3: held
        time.sleep(0.5)
        second = complete(router, secret)
        assert slow.result().status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert error_of(second)["code"] == "credit_held"  # not spent: retry when the first is done
    assert complete(router, secret).status_code == 200  # 0.7 spent, nothing held: under 1


def test_concurrency_limit(router: Router) -> None:
    secret = new_key(router, "--max-concurrent", "1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(complete, router, secret, "fake/slow")
        time.sleep(0.5)
        second = complete(router, secret)
        assert slow.result().status_code == 200
    assert second.status_code == 429 and "concurren" in error_of(second)["message"]
    assert complete(router, secret).status_code == 200  # the slot came back


def test_models_restriction(router: Router) -> None:
    secret = new_key(router, "--models", "fake/ok")
    assert complete(router, secret).status_code == 200
    refused = complete(router, secret, model="fake/other")
    assert refused.status_code == 403
    assert error_of(refused) | {"message": ""} == {
        "code": "model_not_allowed",
        "message": "",
        "param": "model",
        "type": "permission_error",
    }
    fallback = complete(router, secret, models=["fake/other"])
    assert fallback.status_code == 403 and error_of(fallback)["param"] == "models[0]"
    listed = httpx.get(f"{router.api}/models", headers=auth(secret)).json()["data"]
    assert [m["id"] for m in listed] == ["fake/ok"]
    everything = httpx.get(f"{router.api}/models", headers=auth(new_key(router))).json()["data"]
    assert {"fake/ok", "fake/other", "fake/slow"} <= {m["id"] for m in everything}


def test_jwt_principal_with_policy_and_claims(router: Router) -> None:
    subject = f"user-{uuid.uuid4().hex[:6]}"
    bearer = token(sub=subject, policy="small")
    assert complete(router, bearer).status_code == 200
    assert complete(router, bearer, model="fake/other").status_code == 403  # counts, too
    assert complete(router, bearer).status_code == 429  # the policy's rpm of 2
    data = httpx.get(f"{router.api}/key", headers=auth(bearer)).json()["data"]
    assert data["kind"] == "jwt" and data["name"] == subject and data["limits"]["rpm"] == 2
    generous = token(sub=f"user-{uuid.uuid4().hex[:6]}", rpm=100)  # limits by claim
    assert httpx.get(f"{router.api}/key", headers=auth(generous)).json()["data"]["limits"]["rpm"] == 100
    unsigned = pyjwt.encode(
        {"iss": ISSUER, "aud": "llmrouter", "sub": "x", "exp": int(time.time()) + 60},
        None,
        algorithm="none",
    )
    for bad in (unsigned, token(aud="other"), token(iss="https://evil"), token(exp=1)):
        r = complete(router, bad)
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error", bad


# -- the ledger -----------------------------------------------------------------------------------


def test_generation_is_visible_to_its_principal_and_admins(router: Router, admin: str) -> None:
    secret = new_key(router)
    answer = complete(router, secret, user="alice", metadata={"team": "a"})
    request_id = answer.json()["id"]
    record = generation(router, secret, request_id)
    assert record["id"] == request_id and record["status"] == 200
    assert (record["model"], record["provider"], record["model_requested"]) == (
        "fake/ok",
        "fake",
        "fake/ok",
    )
    assert (record["prompt_tokens"], record["completion_tokens"]) == (3, 2)
    assert record["cost"] == pytest.approx(0.7) and record["finish_reason"] == "stop"
    assert record["attempts"][0].startswith("fake/ok ok") and record["latency_ms"] > 0
    assert generation(router, admin, request_id)["id"] == request_id
    other = httpx.get(
        f"{router.api}/generation", params={"id": request_id}, headers=auth(new_key(router))
    )
    assert other.status_code == 404
    assert httpx.get(f"{router.api}/generation", headers=auth(secret)).status_code == 400


def test_failures_streams_and_cancellations_are_recorded(router: Router) -> None:
    secret = new_key(router)
    failed = complete(router, secret, model="fake/status-500")
    assert failed.status_code == 502
    record = generation(router, secret, failed.headers["x-request-id"])
    assert record["status"] == 502 and record["error"] and record["cost"] == 0
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=auth(secret),
        json={"model": "fake/ok", "prompt": "hi", "stream": True},
        timeout=10,
    ) as r:
        streamed_id = r.headers["x-request-id"]
        assert r.read().endswith(b"data: [DONE]\n\n")
    record = generation(router, secret, streamed_id)
    assert record["stream"] is True and record["ttft_ms"] is not None and record["completion_tokens"] > 0


def test_a_client_that_leaves_is_recorded_as_cancelled(router: Router) -> None:
    secret = new_key(router)
    match = KEY_PATTERN.match(secret)
    assert match is not None
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{router.api}/completions",
            headers=auth(secret),
            json={"model": "fake/hang", "prompt": "hi"},
            timeout=0.5,
        )
    deadline = time.monotonic() + 5
    mine: list[dict[str, Any]] = []
    while not mine and time.monotonic() < deadline:
        time.sleep(0.1)
        mine = [r for r in usage_rows(router, "--by", "key") if r["key"] == f"key:{match.group('id')}"]
    assert mine and mine[0]["requests"] == 1 and mine[0]["failed"] == 1


def usage_rows(router: Router, *args: str) -> list[dict[str, Any]]:
    return json.loads(router.cli("usage", "--json", *args).stdout)  # type: ignore[no-any-return]


def test_usage_command_totals(router: Router) -> None:
    secret = new_key(router)
    for _ in range(2):
        assert complete(router, secret).status_code == 200
    by_model = {r["model"]: r for r in usage_rows(router, "--by", "model")}
    assert by_model["fake/ok"]["requests"] >= 2 and by_model["fake/ok"]["cost"] > 0
    table = router.cli("usage", "--by", "provider").stdout
    assert table.splitlines()[0].split()[:2] == ["PROVIDER", "REQUESTS"] and "fake" in table
    csv_text = router.cli("usage", "--by", "day", "--csv").stdout
    assert csv_text.splitlines()[0] == "day,requests,failed,prompt_tokens,completion_tokens,cost"
    assert time.strftime("%Y-%m-%d", time.gmtime()) in csv_text
    assert usage_rows(router, "--since", "2000-01-01", "--until", "2000-01-02") == []
    bad = router.cli("usage", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 1 and "not a date" in bad.stderr


def test_unauthenticated_requests_write_nothing(router: Router) -> None:
    before = sum(r["requests"] for r in usage_rows(router, "--by", "key"))
    for _ in range(3):
        assert complete(router, "lr-nothing").status_code == 401
    time.sleep(0.2)
    assert sum(r["requests"] for r in usage_rows(router, "--by", "key")) == before


def test_refused_requests_count_against_the_rate_limit(router: Router) -> None:
    secret = new_key(router, "--rpm", "3")
    assert complete(router, secret, max_tokens=-1).status_code == 400
    garbage = httpx.post(
        f"{router.api}/completions",
        headers={**auth(secret), "Content-Type": "application/json"},
        content=b"{not json",
        timeout=10,
    )
    assert garbage.status_code == 400
    assert complete(router, secret, model="no/such-model").status_code == 404
    assert complete(router, secret).status_code == 429  # the refusals used the minute's three


def test_max_tokens_null_reserves_the_whole_context(router: Router) -> None:
    secret = new_key(router, "--tpm", "5000")  # fake/ok has no known context: 8192 assumed
    r = complete(router, secret, max_tokens=None)
    assert r.status_code == 400 and error_of(r)["code"] == "request_exceeds_tpm"
    assert complete(router, secret, max_tokens=100).status_code == 200


def test_a_stream_cut_short_is_still_charged(router: Router) -> None:
    secret = new_key(router, "--credit-limit", "100")
    match = KEY_PATTERN.match(secret)
    assert match is not None
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=auth(secret),
        json={"model": "fake/ok", "prompt": "hi", "stream": True, "max_tokens": 5},
        timeout=10,
    ) as r:
        request_id = r.headers["x-request-id"]
        next(r.iter_raw())  # the first chunk, then the client leaves
    deadline = time.monotonic() + 5
    record: dict[str, Any] = {}
    while time.monotonic() < deadline and not record:
        time.sleep(0.1)
        got = httpx.get(f"{router.api}/generation", params={"id": request_id}, headers=auth(secret))
        record = got.json().get("data", {}) if got.status_code == 200 else {}
    assert record, "no record of the cut stream"
    assert record["model"] == "fake/ok" and record["attempts"]
    assert record["prompt_tokens"] + record["completion_tokens"] > 0
    assert record["cost"] > 0


def test_a_stream_the_upstream_cuts_is_charged_for_what_was_sent(router: Router) -> None:
    secret = new_key(router)
    with httpx.stream(
        "POST",
        f"{router.api}/completions",
        headers=auth(secret),
        json={"model": "fake/truncated", "prompt": "hi", "stream": True},
        timeout=10,
    ) as r:
        request_id = r.headers["x-request-id"]
        events = r.read().decode()
    assert '"error"' in events and "[DONE]" not in events
    record = generation(router, secret, request_id)
    assert record["error"] and record["completion_tokens"] > 0 and record["cost"] > 0


@pytest.mark.parametrize(
    ("path", "query"),
    [("/api/v1/generation", {"id": "a\u0000b"}), ("/api/v1/keys/a%00b", None)],
)
def test_nul_in_ids_is_a_404(router: Router, admin: str, path: str, query: Any) -> None:
    r = httpx.get(router.base + path, params=query, headers=auth(admin), timeout=10)
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "expires_at": 2**63}, "expires_at"),
        ({"name": "x", "credit_limit": 1e300}, "credit_limit"),
        ({"name": "x", "rpm": 2**60}, "rpm"),
    ],
)
def test_out_of_range_limits_are_400s(
    router: Router, admin: str, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(f"{router.api}/keys", headers=auth(admin), json=body, timeout=10)
    assert r.status_code == 400 and error_of(r)["param"] == param


def test_error_records_are_durable_before_the_error_is_sent(router: Router) -> None:
    secret = new_key(router)
    failed = complete(router, secret, model="fake/status-500")
    # No wait: the record was written before the 502 left.
    r = httpx.get(
        f"{router.api}/generation", params={"id": failed.headers["x-request-id"]}, headers=auth(secret)
    )
    assert r.status_code == 200 and r.json()["data"]["status"] == 502


# -- the chat endpoint: the same limits and ledger ------------------------------------------------


def test_both_endpoints_count_against_one_rate_limit(router: Router) -> None:
    secret = new_key(router, "--rpm", "3")
    assert [complete(router, secret).status_code, chat(router, secret).status_code] == [200, 200]
    assert chat(router, secret).headers["x-ratelimit-remaining"] == "0"
    refused = chat(router, secret)
    assert refused.status_code == 429 and error_of(refused)["type"] == "rate_limit_error"
    assert complete(router, secret).status_code == 429


def test_chat_spends_and_holds_credit(router: Router) -> None:
    secret = new_key(router, "--credit-limit", "1.0")
    first = chat(router, secret)
    assert first.status_code == 200, first.text
    assert first.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert chat(router, secret).status_code == 200  # 1.4: over by its own cost
    refused = chat(router, secret)
    assert refused.status_code == 402 and error_of(refused)["code"] == "credit_limit_exceeded"
    held = new_key(router, "--credit-limit", "1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, router, held, "fake/slow-priced")
        time.sleep(0.5)
        second = chat(router, held)
        assert slow.result().status_code == 200
    assert second.status_code == 429 and error_of(second)["code"] == "credit_held"


def test_chat_keeps_to_the_keys_models(router: Router) -> None:
    secret = new_key(router, "--models", "fake/ok")
    assert chat(router, secret).status_code == 200
    refused = chat(router, secret, model="fake/other")
    assert refused.status_code == 403 and error_of(refused)["param"] == "model"
    fallback = chat(router, secret, models=["fake/other"])
    assert fallback.status_code == 403 and error_of(fallback)["param"] == "models[0]"


def test_chat_requests_are_recorded_with_their_route(router: Router) -> None:
    secret = new_key(router)
    ok = chat(router, secret, user="u-chat", metadata={"team": "a"})
    assert ok.headers["x-request-id"] == ok.json()["id"] and ok.json()["id"].startswith("chatcmpl-")
    streamed = chat(router, secret, stream=True)
    failed = chat(router, secret, model="fake/status-500")
    assert failed.status_code == 502
    records = {}
    for r in (ok, streamed, failed):
        got = httpx.get(
            f"{router.api}/generation", params={"id": r.headers["x-request-id"]}, headers=auth(secret)
        )
        records[r] = got.json()["data"]
    assert {rec["route"] for rec in records.values()} == {"chat.completions"}
    assert records[ok]["user"] == "u-chat" and records[ok]["metadata"] == {"team": "a"}
    assert (records[ok]["prompt_tokens"], records[ok]["completion_tokens"]) == (3, 2)
    assert records[streamed]["stream"] is True and records[streamed]["status"] == 200
    assert records[failed]["status"] == 502 and records[failed]["error"]
