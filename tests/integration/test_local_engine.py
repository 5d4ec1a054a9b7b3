"""The embedded engine: determinism, OpenAI's offsets, empty prompts, early refusals, fair turns."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import Router
from tests.spec import assert_error

MODEL = "local/smollm2-135m-instruct"


def complete(router: Router, timeout: float = 60, **body: object) -> httpx.Response:
    return httpx.post(
        f"{router.api}/completions",
        headers=router.headers(),
        json={"model": MODEL, **body},
        timeout=timeout,
    )


def test_results_do_not_depend_on_what_ran_before(router: Router) -> None:
    body = {"prompt": "The capital of France is a city that", "max_tokens": 6, "logprobs": 2}
    cold = complete(router, **body, temperature=0).json()["choices"][0]
    warm = complete(router, **body, temperature=0).json()["choices"][0]
    assert cold["logprobs"] == warm["logprobs"]
    seeded = {complete(router, **body, seed=7).json()["choices"][0]["text"] for _ in range(3)}
    assert len(seeded) == 1
    both = complete(router, **body, n=2, temperature=0).json()["choices"]
    assert both[0]["logprobs"] == both[1]["logprobs"] == cold["logprobs"]


def test_text_offset_indexes_the_choice_text_echo_included(router: Router) -> None:
    # The contract (unlike OpenAI, whose offsets count from the prompt's start even
    # without echo): offsets are positions in the choice's own text.
    prompt = "The sky is"
    choice = complete(router, prompt=prompt, max_tokens=4, logprobs=0, temperature=0).json()["choices"][
        0
    ]
    offsets = choice["logprobs"]["text_offset"]
    tokens = choice["logprobs"]["tokens"]
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert "".join(tokens) == choice["text"]
    echoed = complete(router, prompt=prompt, max_tokens=2, logprobs=1, echo=True, temperature=0)
    lp = echoed.json()["choices"][0]["logprobs"]
    assert lp["text_offset"][0] == 0 and lp["token_logprobs"][0] is None
    assert "".join(lp["tokens"]) == echoed.json()["choices"][0]["text"]
    assert echoed.json()["choices"][0]["text"].startswith(prompt)


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_prompt_starts_a_new_document(router: Router, stream: bool) -> None:
    for prompt in ("", ["Hi", ""]):
        r = complete(router, prompt=prompt, max_tokens=3, stream=stream)
        assert r.status_code == 200, r.text
    r = complete(router, prompt="", max_tokens=2, echo=True, logprobs=1, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["text_offset"][0] == 0


def test_a_request_that_cannot_fit_is_refused_without_queueing(router: Router) -> None:
    busy = threading.Thread(
        target=complete,
        kwargs={"router": router, "prompt": "Count:", "max_tokens": 400, "logit_bias": {"2": -100}},
    )
    busy.start()
    time.sleep(0.3)
    started = time.monotonic()
    r = complete(router, prompt="Hi", max_tokens=9000, stream=True)
    assert time.monotonic() - started < 1.0
    assert_error(r, 400, "max_tokens")
    busy.join()


def test_choices_take_fair_turns(router: Router) -> None:
    """A request for many choices does not hold the model until all of them are done."""
    done: dict[str, float] = {}

    def run(name: str, **body: object) -> None:
        assert complete(router, **body).status_code == 200
        done[name] = time.monotonic()

    big = threading.Thread(
        target=run,
        args=("big",),
        kwargs={"prompt": "Count:", "max_tokens": 40, "n": 8, "logit_bias": {"2": -100}},
    )
    big.start()
    time.sleep(0.3)
    run("small", prompt="Hi", max_tokens=2)
    big.join()
    assert done["small"] < done["big"]


def test_a_prompt_too_long_for_the_local_model_goes_to_the_next_model(router: Router) -> None:
    r = complete(router, prompt="hello " * 2100, max_tokens=1, models=["fake/ok"])
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fake/ok"
    assert r.headers["x-llmrouter-attempts"].startswith(
        "local/smollm2-135m-instruct context_length_exceeded"
    )
