"""The official openai SDK, unmodified, against llmrouter: sync and async, streaming and not, on the
embedded model and on llama-cpp-python's server as an upstream."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import Router
from tests.spec import validate

MODELS = ["local/smollm2-135m-instruct", "upstream/smollm2"]


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.api, api_key=router.key, max_retries=0)


@pytest.mark.parametrize("model", MODELS)
def test_completion_matches_the_spec(router: Router, model: str) -> None:
    raw = client(router).completions.with_raw_response.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    completion = raw.parse()
    body = completion.model_dump(exclude_unset=True)
    validate(body, "CompletionResponse")
    assert completion.id.startswith("cmpl-")
    assert raw.headers["x-request-id"] == completion.id
    assert completion.object == "text_completion"
    assert completion.model == model
    assert body["provider"] == ("local" if model.startswith("local") else "llamaserver")
    assert completion.choices[0].text.strip()
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert body["choices"][0]["native_finish_reason"] in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


@pytest.mark.parametrize("model", MODELS)
def test_streaming_gives_the_same_text_as_not_streaming(router: Router, model: str) -> None:
    args = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = client(router).completions.create(**args)
    chunks = list(
        client(router).completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len({c.id for c in chunks}) == 1
    assert all(c.model == model for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_async_client_streams_and_completes(router: Router) -> None:
    async def main() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=router.api, api_key=router.key, max_retries=0)
        done = await aclient.completions.create(
            model="smollm2", prompt="Hello", max_tokens=5, temperature=0
        )
        stream = await aclient.completions.create(
            model="smollm2", prompt="Hello", max_tokens=5, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        await aclient.close()
        return done.choices[0].text, streamed

    whole, streamed = asyncio.run(main())
    assert whole == streamed and whole


def test_default_model_is_used_when_model_is_omitted(router: Router) -> None:
    # The SDK always sends `model`; a raw request shows the default.
    r = httpx.post(
        f"{router.api}/completions", headers=router.headers(), json={"prompt": "Hi", "max_tokens": 2}
    )
    assert r.status_code == 200
    assert r.json()["model"] == "local/smollm2-135m-instruct"


def test_omitted_max_tokens_means_sixteen(router: Router) -> None:
    completion = client(router).completions.create(
        model="local/smollm2-135m-instruct",
        prompt="Count: one, two, three,",
        temperature=0,
        logit_bias={"2": -100},  # no end-of-text: the model must run to the limit
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_local_parameters_are_honoured(router: Router) -> None:
    c = client(router)
    args = {"model": "local/smollm2-135m-instruct", "prompt": "The sky is", "max_tokens": 10}
    seeded = [c.completions.create(**args, seed=42, temperature=1.0).choices[0].text for _ in "ab"]
    assert seeded[0] == seeded[1]
    batch = c.completions.create(**{**args, "prompt": ["One", "Two"]}, n=2, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # temperature 0: same prompt, same text
    echo = c.completions.create(**{**args, "max_tokens": 3}, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("The sky is")
    probs = c.completions.create(**args, logprobs=3, temperature=0)
    lp = probs.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == probs.choices[0].text
    assert all(len(top) == 3 for top in lp.top_logprobs)
    stopped = c.completions.create(**{**args, "max_tokens": 30}, temperature=0, stop=[" blue"])
    assert " blue" not in stopped.choices[0].text
    tokens = c.completions.create(**{**args, "prompt": [504, 3575, 282]}, temperature=0)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 3
