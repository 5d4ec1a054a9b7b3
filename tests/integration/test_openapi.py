"""The served OpenAPI document: valid OpenAPI 3.2, the shared spec's schemas made exact, our
additions."""

from __future__ import annotations

import json
from typing import Any

import httpx
from openapi_spec_validator import validate as validate_openapi

from llmrouter.openapi import shared_spec
from llmrouter.openapi._schema import as_openapi_3_2
from tests.conftest import Router
from tests.spec import SHARED

# What the served document may add to a shared schema: each keyword narrows what the schema
# accepts to what the router accepts (issue 4), or only says something.
NARROWING = {
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "pattern",
    "propertyNames",
    "additionalProperties",
    "if",
    "then",
    "format",
    "description",
}
# Where it differs otherwise: corrections (the first echoed token's logprob and top_logprobs are
# null; token ids are integers) and the `provider` extension.
CORRECTED = {
    "CompletionLogprobs.properties.token_logprobs.items.type": ["number", "null"],
    "CompletionLogprobs.properties.top_logprobs.items.type": ["object", "null"],
    "CompletionCreateParamsPrompt.oneOf[2].items": {"type": "integer", "minimum": 0},
    "CompletionCreateParamsPrompt.oneOf[3].items.items": {"type": "integer", "minimum": 0},
}
ADDED = {
    "CompletionCreateParams.properties.provider",
    # OpenAI's usage details, where a provider reports them (chat kinds behind /completions)
    "CompletionUsage.properties.prompt_tokens_details",
    "CompletionUsage.properties.completion_tokens_details",
    "CompletionChoice.properties.refusal",  # the text is a chat API's refusal
}


def assert_narrows(served: Any, shared: Any, where: str) -> None:
    """`served` is `shared` with NARROWING keywords added, but for CORRECTED and ADDED."""
    if where in CORRECTED:
        assert served == CORRECTED[where], where
    elif isinstance(shared, dict):
        assert isinstance(served, dict), where
        for key, value in shared.items():
            assert key in served, f"{where}.{key}"
            assert_narrows(served[key], value, f"{where}.{key}")
        added = {f"{where}.{key}" for key in set(served) - set(shared)}
        keywords = {name.rsplit(".", 1)[1] for name in added - ADDED}
        assert keywords <= NARROWING, (where, keywords)
    elif isinstance(shared, list):
        assert isinstance(served, list) and len(served) == len(shared), where
        for i, (mine, theirs) in enumerate(zip(served, shared, strict=True)):
            assert_narrows(mine, theirs, f"{where}[{i}]")
    else:
        assert served == shared, where


def test_served_spec_is_valid_openapi_without_auth(router: Router) -> None:
    r = httpx.get(f"{router.api}/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    validate_openapi(spec)
    assert spec["openapi"] == "3.2.0"
    assert spec["paths"]["/completions"]["post"]["tags"] == ["completions"]
    assert "/models" in spec["paths"]
    assert {"/key", "/generation", "/keys", "/keys/{id}", "/keys/{id}/rotate"} <= set(spec["paths"])
    responses = spec["paths"]["/completions"]["post"]["responses"]
    assert {"402", "403", "413", "415", "429", "502", "503", "504"} <= set(responses)
    assert "X-RateLimit-Remaining" in responses["429"]["headers"]
    create_key = spec["paths"]["/keys"]["post"]["responses"]
    assert {"201", "400", "401", "403", "409", "413", "415"} <= set(create_key)
    assert spec["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]["required"]
    shared = json.loads(SHARED.read_text()) if SHARED.exists() else shared_spec()
    served = spec["components"]["schemas"]
    for name, schema in as_openapi_3_2(shared)["components"]["schemas"].items():
        assert_narrows(served[name], schema, name)


def test_served_request_bounds_are_the_routers(router: Router) -> None:
    """The issue's list: each range the router enforces, in the served schema."""
    schemas = httpx.get(f"{router.api}/openapi.json").json()["components"]["schemas"]
    params = schemas["CompletionCreateParams"]["properties"]
    bounds = {
        name: (params[name].get("minimum"), params[name].get("maximum"))
        for name in ("temperature", "top_p", "n", "best_of", "frequency_penalty", "max_tokens")
    }
    assert bounds == {
        "temperature": (0, 2),
        "top_p": (0, 1),
        "n": (1, 128),
        "best_of": (1, 128),
        "frequency_penalty": (-2, 2),
        "max_tokens": (0, None),
    }
    assert params["presence_penalty"]["minimum"] == -2 and params["presence_penalty"]["maximum"] == 2
    bias = params["logit_bias"]
    assert (bias["additionalProperties"]["minimum"], bias["additionalProperties"]["maximum"]) == (
        -100,
        100,
    )
    assert bias["propertyNames"] == {"pattern": "^[0-9]{1,10}$"}
    assert schemas["CompletionCreateParamsStop"]["oneOf"][1]["maxItems"] == 4
    prompt = schemas["CompletionCreateParamsPrompt"]["oneOf"]
    assert [p.get("minItems") for p in prompt] == [None, 1, 1, 1]
    assert prompt[2]["items"] == {"type": "integer", "minimum": 0}
    generation_id = spec_parameter(router, "/generation", "get", "id")
    assert generation_id["schema"]["minLength"] == 1


def spec_parameter(router: Router, path: str, method: str, name: str) -> dict[str, Any]:
    spec = httpx.get(f"{router.api}/openapi.json").json()
    parameters = spec["paths"][path][method]["parameters"]
    return next(p for p in parameters if p["name"] == name)  # type: ignore[no-any-return]


def test_packaged_spec_is_the_shared_spec() -> None:
    if SHARED.exists():
        assert shared_spec() == json.loads(SHARED.read_text())


def test_health_and_ready_need_no_key(router: Router) -> None:
    assert httpx.get(f"{router.base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{router.base}/ready").json() == {"status": "ready"}


def test_models_list_format(router: Router) -> None:
    r = httpx.get(f"{router.base}/v1/models", headers=router.headers())
    body = r.json()
    assert body["object"] == "list"
    local = next(m for m in body["data"] if m["id"] == "local/smollm2-135m-instruct")
    assert local["object"] == "model" and local["owned_by"]
    assert isinstance(local["created"], int)
    assert local["context_length"] == 2048
    assert {"echo", "logprobs", "n", "seed", "stop", "logit_bias"} <= set(local["supported_parameters"])
    assert "suffix" not in local["supported_parameters"]
    assert {m["id"] for m in body["data"]} >= {"smollm2", "fake/ok", "upstream/smollm2"}
