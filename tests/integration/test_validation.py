"""Every kind of bad input gets a 4xx in the spec's error shape, naming the field."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Router
from tests.spec import assert_error

OUT_OF_RANGE = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"frequency_penalty": 2.1}, "frequency_penalty"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"logprobs": -1}, "logprobs"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"logit_bias": {"50256": 101}}, "logit_bias.50256"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
]
WRONG_TYPES = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b", 3]}, "prompt[2]"),
    ({"prompt": ["a", "b", {}]}, "prompt[2]"),
    ({"prompt": [[1, 2], [-1]]}, "prompt[1][0]"),
    ({"prompt": [[1], []]}, "prompt[1]"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"echo": "yes"}, "echo"),
    ({"stream": None}, "stream"),
    ({"user": None}, "user"),
    ({"models": "a"}, "models"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"stream_options": {"include_usage": "x"}, "stream": True}, "stream_options.include_usage"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "grammar"}}, "response_format.grammar"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"best_of": 3, "n": 1, "stream": True}, "best_of"),
]


def post(router: Router, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{router.api}/completions", headers=router.headers(), json=body, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("extra", "param"), OUT_OF_RANGE + WRONG_TYPES)
def test_bad_values_are_400_naming_the_field(router: Router, extra: dict, param: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 1, **extra}
    assert_error(post(router, body), 400, param)


def test_missing_prompt(router: Router) -> None:
    assert_error(post(router, {"max_tokens": 1}), 400, "prompt")


def test_empty_prompt_list(router: Router) -> None:
    assert_error(post(router, {"prompt": []}), 400, "prompt")


def test_malformed_json(router: Router) -> None:
    r = httpx.post(f"{router.api}/completions", headers=router.headers(), content=b'{"prompt": ')
    body = assert_error(r, 400)
    assert body["error"]["code"] == "invalid_json"


def test_body_not_an_object(router: Router) -> None:
    assert_error(post(router, ["prompt"]), 400)


def test_wrong_content_type(router: Router) -> None:
    headers = {**router.headers(), "Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(f"{router.api}/completions", headers=headers, content=b"prompt=hi")
    assert_error(r, 415, "content-type")


def test_body_over_the_limit_is_413_even_without_content_length(router: Router) -> None:
    big = b'{"prompt": "' + b"x" * 70_000 + b'"}'  # the test server's limit is 64 KiB

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(f"{router.api}/completions", headers=router.headers(), content=chunks())
    assert "content-length" not in r.request.headers
    assert_error(r, 413)
    r = httpx.post(f"{router.api}/completions", headers=router.headers(), content=big)
    assert_error(r, 413)


def test_unknown_model_is_404(router: Router) -> None:
    assert_error(post(router, {"prompt": "Hi", "model": "nope/nope"}), 404, "model")
    body = {"prompt": "Hi", "model": "smollm2", "models": ["smollm2", "nope"]}
    assert_error(post(router, body), 404, "models[1]")


def test_parameters_a_model_cannot_honour_are_refused_not_dropped(router: Router) -> None:
    cases = [
        ({"logprobs": 21}, "logprobs"),
        # best_of is chosen by the router from the candidates' logprobs, which echo would mix
        # with the prompt's
        ({"best_of": 3, "echo": True, "logprobs": 1}, "best_of"),
    ]
    for extra, param in cases:
        body = {"prompt": "Hi", "model": "local/smollm2-135m-instruct", "max_tokens": 1, **extra}
        error = assert_error(post(router, body), 400, param)["error"]
        assert "local/smollm2-135m-instruct" in error["message"]
        assert error["code"] == "unsupported_parameter"


def test_prompt_longer_than_the_context(router: Router) -> None:
    body = {"prompt": "hello " * 2100, "model": "smollm2", "max_tokens": 1}
    error = assert_error(post(router, body), 400, "prompt")["error"]
    assert error["code"] == "context_length_exceeded"
    body = {"prompt": "hello", "model": "smollm2", "max_tokens": 5000}
    assert_error(post(router, body), 400, "max_tokens")


def test_token_ids_outside_the_vocabulary(router: Router) -> None:
    body = {"prompt": [1, 2, 10**6], "model": "smollm2", "max_tokens": 1}
    assert_error(post(router, body), 400, "prompt[2]")


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic abc", "Bearer", "Bearer lr-nope", "Bearer lr-AAAAAAAAAAAA_" + "A" * 38],
)
def test_bad_credentials_are_401(router: Router, authorization: str | None) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    r = httpx.post(f"{router.api}/completions", headers=headers, json={"prompt": "Hi"})
    assert_error(r, 401)
    assert_error(httpx.get(f"{router.api}/models", headers=headers), 401)


def test_revoked_key_is_401(router: Router) -> None:
    secret = router.cli("keys", "create", "--name", "short-lived").stdout.strip().splitlines()[-1]
    headers = {**router.headers(), "Authorization": f"Bearer {secret}"}
    ok = httpx.post(f"{router.api}/completions", headers=headers, json={"prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200
    router.cli("keys", "revoke", "short-lived")
    r = httpx.post(f"{router.api}/completions", headers=headers, json={"prompt": "Hi", "max_tokens": 1})
    assert assert_error(r, 401)["error"]["code"] == "revoked_api_key"


def test_unknown_route_and_wrong_method(router: Router) -> None:
    assert_error(httpx.get(f"{router.api}/nothing", headers=router.headers()), 404)
    assert_error(httpx.get(f"{router.api}/completions", headers=router.headers()), 405)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/v1/completions", "POST"),
        ("TRACE", "/v1/models", "GET"),
        ("DELETE", "/api/v1/keys", "GET, POST"),
        ("POST", "/api/v1/keys/some-id", "GET, PATCH, DELETE"),
        ("GET", "/api/v1/keys/some-id/rotate", "POST"),
        ("DELETE", "/api/v1/keys/some-id/rotate", "POST"),
        ("PUT", "/health", "GET"),
    ],
)
def test_a_wrong_method_is_405_allowing_exactly_the_paths_methods(
    router: Router, method: str, path: str, allow: str
) -> None:
    """RFC 9110: a 405 carries `Allow`; each path lists its own methods, before any auth."""
    r = httpx.request(method, f"{router.base}{path}")
    assert_error(r, 405)
    assert r.headers["allow"] == allow


def test_keys_never_reach_the_log(router: Router) -> None:
    r = httpx.post(
        f"{router.api}/completions", headers=router.headers(), json={"prompt": "x"}, timeout=30
    )
    assert r.status_code == 200
    assert router.key not in router.log.read_text()
    assert "upstream-secret" not in router.log.read_text()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "\xff\xfe"}', ""),
        (b'{"prompt": "Hi", "metadata": {"k": ' + b"[" * 5000 + b"]" * 5000 + b"}}", ""),
        (b'{"prompt": "Hi", "logit_bias": {"\xc2\xb2": 1}}', "logit_bias.\u00b2"),
        # An error quotes at most 64 characters of the client's input (issue 11).
        (
            b'{"prompt": "Hi", "logit_bias": {"' + b"1" * 5000 + b'": 1}}',
            "logit_bias." + "1" * 64 + "...",
        ),
        (b'{"prompt": "Hi", "logit_bias": {"1": 1e999}}', "logit_bias"),
    ],
)
def test_hostile_bodies_are_400(router: Router, body: bytes, param: str) -> None:
    r = httpx.post(f"{router.api}/completions", headers=router.headers(), content=body)
    assert_error(r, 400, param)


def test_logit_bias_ids_are_checked_against_the_vocabulary(router: Router) -> None:
    body = {"prompt": "Hi", "model": "smollm2", "max_tokens": 1, "logit_bias": {"49152": 5}}
    error = assert_error(post(router, body), 400, "logit_bias.49152")["error"]
    assert "vocabulary" in error["message"]


@pytest.mark.parametrize("model", ["smollm2", "lm/full", "upstream/smollm2", "basic/ok"])
@pytest.mark.parametrize(
    ("grammar", "where"),
    [
        ('root ::= ("yes" | "no"', "line 1, column 23"),
        ('root = "yes"', "line 1, column 6"),
        ('root ::= answer\nanswr ::= "x"', "line 1"),
        ('start ::= "x"', "root"),
    ],
)
def test_a_grammar_that_does_not_parse_is_a_400_with_the_place(
    router: Router, model: str, grammar: str, where: str
) -> None:
    # At the edge, whichever deployment would have answered (even one that takes no grammar).
    body = {"prompt": "Hi", "model": model, "response_format": {"type": "grammar", "grammar": grammar}}
    error = assert_error(post(router, body), 400, "response_format.grammar")["error"]
    assert where in error["message"], error["message"]


def test_a_schema_that_is_not_json_schema_is_a_400(router: Router) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    body = {"prompt": "Hi", "model": "lm/full", "response_format": fmt}
    error = assert_error(post(router, body), 400, "response_format.json_schema.schema")["error"]
    assert "bogus" in error["message"]
    fmt["json_schema"]["schema"] = {"$ref": "https://example.invalid/schema.json"}  # type: ignore[index]
    r = post(router, {**body, "model": "lm/no-response_format", "prompt": '{"a": 1}\n'})
    assert_error(r, 400, "response_format.json_schema.schema")  # never fetched
