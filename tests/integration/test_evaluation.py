"""What an evaluation harness counts on, against the embedded model: one logprobs entry per token
`usage` counts (the end-of-text token too), control tokens in /completions prompts read as llama.cpp's
server and vLLM read them, and the model's tokenizer at /tokenize, /detokenize and /tokenizer_info.

Logprobs are compared with llama-cpp-python run directly on the same GGUF, in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import BIN, Router, ask, start_router, stop
from tests.spec import assert_error

MODEL = "local/smollm2-135m-instruct"
PLAIN = "local/smollm2-plain"
CHAT = "<|im_start|>user\nHi<|im_end|>"
END = "<|im_end|>"  # SmolLM2-Instruct's end of generation


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    """A router with the embedded model twice (control tokens parsed, and `plain`), and
    upstreams whose tokenizer endpoints are vLLM's and llama.cpp's server's (the fake's)."""
    tmp = tmp_path_factory.mktemp("evaluation")
    config = f"""default_model: {MODEL}
routing:
  retry_budget: {{min_per_second: 1000}}
providers:
  local: {{kind: llamacpp, n_ctx: 2048}}
  vllm: {{kind: openai, base_url: {fake_upstream}/v1, tokenizer: vllm}}
  llamacpp:
    kind: openai
    base_url: {fake_upstream}/v1
    tokenizer: llama.cpp
    tokenizer_url: {fake_upstream}/llamacpp
  plain_upstream: {{kind: openai, base_url: {fake_upstream}/v1}}
models:
  - id: {MODEL}
    deployments: [{{provider: local, model: smollm2-135m-instruct}}]
  - id: {PLAIN}
    deployments: [{{provider: local, model: smollm2-135m-instruct, special_tokens: plain}}]
  - id: tok/vllm
    context_length: 1000
    deployments: [{{provider: vllm, model: ok}}]
  - id: tok/fallback
    strategy: ordered
    deployments: [{{provider: vllm, model: status-503}}, {{provider: llamacpp, model: ok}}]
  - id: tok/llamacpp
    deployments: [{{provider: llamacpp, model: ok}}]
  - id: tok/refused
    strategy: ordered
    deployments: [{{provider: vllm, model: status-400}}, {{provider: llamacpp, model: ok}}]
  - id: tok/refused-only
    deployments: [{{provider: vllm, model: status-400}}]
  - id: tok/nested
    deployments: [{{provider: vllm, model: nested}}]
  - id: tok/hostile
    deployments: [{{provider: vllm, model: nested}}, {{provider: vllm, model: bad-ids}}]
  - id: tok/info-second
    deployments: [{{provider: llamacpp, model: ok}}, {{provider: vllm, model: ok}}]
  - id: fake/none
    deployments: [{{provider: plain_upstream, model: ok}}]
"""
    router = start_router(tmp, config)
    try:
        yield router
    finally:
        stop(router.proc)


@pytest.fixture(scope="module")
def direct(gguf: Path) -> Any:
    """llama-cpp-python on the same file, every position's logits kept."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=2048, logits_all=True, verbose=False)


def logprobs_direct(llm: Any, tokens: list[int]) -> list[np.ndarray]:
    """log-softmax after each prefix of `tokens` (row i: the distribution of token i + 1)."""
    llm.reset()
    llm.eval(tokens)
    return [_log_softmax(np.array(row, dtype=np.float64)) for row in llm.scores[: len(tokens)]]


def greedy_direct(llm: Any, prompt: list[int], limit: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding up to the end-of-generation token, one token a step after the prompt (as a
    server decodes): the tokens, and the log-softmax each was drawn from."""
    row = logprobs_direct(llm, prompt)[-1]
    ids: list[int] = []
    rows: list[np.ndarray] = []
    while len(ids) < limit:
        token = int(np.argmax(row))
        ids.append(token)
        rows.append(row)
        if token in (0, 2, 4):  # the model's end-of-generation tokens
            break
        llm.eval([token])
        row = _log_softmax(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    return ids, rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())  # type: ignore[no-any-return]


def post(router: Router, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{router.base}{path}", headers={**router.headers(), **headers}, json=body, timeout=60
    )


def tokenize(router: Router, prompt: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    r = post(router, "/api/v1/tokenize", {"model": model, "prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# -- 1. the end-of-text token ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_the_end_of_text_token_is_in_logprobs_and_usage_and_out_of_the_text(
    evaluated: Router, direct: Any, stream: bool
) -> None:
    """The issue's figure: a choice that ends on end-of-text counted it in `completion_tokens`
    and left it out of `logprobs`. Now it is listed, spelled out, its logprob the model's, its
    offset the end of the text, which leaves it out. The stop is enforced by the router too, so
    the entry passes through the router's own shaping."""
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 60,
        "temperature": 0,
        "logprobs": 2,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    status, answer, _ = ask(evaluated, {**body, "stop": ["\n\n\n\n"]})
    assert status == 200, answer
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop"
    assert lp["tokens"][-1] == END
    assert len(lp["tokens"]) == answer["usage"]["completion_tokens"]
    assert END not in choice["text"] and "".join(lp["tokens"][:-1]) == choice["text"]
    assert lp["text_offset"][-1] == len(choice["text"])
    assert END in lp["top_logprobs"][-1]  # spelled there too, never ""
    # The same tokens and numbers as the model's own greedy decoding.
    ids, rows = greedy_direct(direct, tokenize(evaluated, prompt)["tokens"], 60)
    assert ids[-1] == 2 and direct.detokenize(ids[:-1]).decode() == choice["text"]
    expected = [row[token] for row, token in zip(rows, ids, strict=True)]
    assert np.allclose(lp["token_logprobs"], expected, atol=1e-6, rtol=0)
    assert math.isclose(lp["top_logprobs"][-1][END], expected[-1], abs_tol=1e-6)


def test_an_answer_that_is_only_end_of_text_lists_that_one_token(evaluated: Router) -> None:
    r = post(
        evaluated,
        "/api/v1/completions",
        {"prompt": "Hello", "max_tokens": 5, "logprobs": 0, "logit_bias": {"2": 100}},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == ""
    assert choice["logprobs"]["tokens"] == [END]
    assert choice["logprobs"]["text_offset"] == [0]
    assert choice["logprobs"]["top_logprobs"] == [{}]
    assert r.json()["usage"]["completion_tokens"] == 1


def test_scoring_with_echo_and_one_token_keeps_every_prompt_token(
    evaluated: Router, direct: Any
) -> None:
    """lm-eval's loglikelihood request (echo, logprobs 1, max_tokens 1) drops the last entry as the
    generated token; with end-of-text the greedy next token it dropped the prompt's last one."""
    prompt = "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\nYes."
    ids = tokenize(evaluated, prompt)["tokens"]
    rows = logprobs_direct(direct, ids)
    assert int(np.argmax(rows[-1])) == 2  # the case of the issue: end-of-text comes next
    body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    r = post(evaluated, "/api/v1/completions", body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == END
    scored = lp["token_logprobs"][1:-1]
    expected = [rows[i - 1][ids[i]] for i in range(1, len(ids))]
    assert np.allclose(scored, expected, atol=1e-6, rtol=0)
    assert r.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 1,
        "total_tokens": len(ids) + 1,
    }


@pytest.mark.parametrize("stream", [False, True])
def test_end_of_text_after_a_partial_character_stands_at_the_texts_end(
    evaluated: Router, stream: bool
) -> None:
    """Token 173 is the first byte of a UTF-8 character, left incomplete: the text ends with
    U+FFFD, which no token spells; the end-of-text entry comes after it, streamed or not."""
    body: dict[str, Any] = {"prompt": [26843], "max_tokens": 2, "logprobs": 1, "seed": 25}
    body |= {"logit_bias": {"173": 100, "2": 100}, "temperature": 2}
    if stream:
        body |= {"stream": True}
    status, answer, _ = ask(evaluated, body)
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["text"] == "\ufffd"
    assert choice["logprobs"]["tokens"] == ["", END]
    assert choice["logprobs"]["text_offset"] == [0, 1]


# Answers where an unfinished UTF-8 character (token 173 is a first byte), control tokens the text
# leaves out (1 <|im_start|>, 5 <file_sep>) and stops meet, pushed there by logit_bias.
UNFINISHED = {
    "before a control token, a stop on U+FFFD": {
        "prompt": "Hi",
        "max_tokens": 6,
        "seed": 0,
        "temperature": 2,
        "logit_bias": {"173": 90, "5": 100, "2": 95},
        "stop": ["\ufffd"],
    },
    "held by a stop that never comes": {
        "prompt": "Hi",
        "max_tokens": 3,
        "seed": 59,
        "temperature": 2,
        "logit_bias": {"81": 84, "173": 90, "1": 100},
        "stop": ["ab"],
    },
    "at the end, a stop on U+FFFD": {
        "prompt": [26843],
        "echo": True,
        "max_tokens": 1,
        "temperature": 0,
        "logit_bias": {"173": 100},
        "stop": ["\ufffd"],
    },
}


@pytest.mark.parametrize("case", list(UNFINISHED))
def test_unfinished_characters_and_hidden_tokens_agree_streamed_or_not(
    evaluated: Router, case: str
) -> None:
    body = {**UNFINISHED[case], "logprobs": 1}
    _, whole, _ = ask(evaluated, body)
    _, streamed, _ = ask(evaluated, {**body, "stream": True})
    got = [
        {k: a["choices"][0].get(k) for k in ("text", "finish_reason", "logprobs")}
        for a in (whole, streamed)
    ]
    for g in got:
        g["logprobs"] = {k: g["logprobs"][k] for k in ("tokens", "text_offset")}
    assert got[0] == got[1]
    choice = got[0]
    lp = choice["logprobs"]
    for token, at in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert at <= len(choice["text"])
        assert choice["text"][at:].startswith(token) or token in ("<|im_start|>", "<file_sep>", END)
    if "stop on" in case:
        assert "\ufffd" not in choice["text"] and choice["finish_reason"] == "stop"
    if case == "held by a stop that never comes":
        assert lp["tokens"][-1] == "<|im_start|>"


def test_a_control_token_the_text_leaves_out_is_named_in_logprobs(evaluated: Router) -> None:
    """Generated without a grammar, `<|im_start|>` is not in the text; logprobs name it, as its
    top_logprobs do, at the place it stands."""
    body = {"prompt": CHAT + "\n", "max_tokens": 1, "logprobs": 1, "temperature": 0}
    r = post(evaluated, "/api/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == ""
    assert choice["logprobs"]["tokens"] == ["<|im_start|>"]
    assert list(choice["logprobs"]["top_logprobs"][0]) == ["<|im_start|>"]
    assert choice["logprobs"]["text_offset"] == [0]


def test_end_of_text_after_reasoning_is_still_listed(evaluated: Router) -> None:
    grammar = {"type": "grammar", "grammar": 'root ::= "<think>x</think>"'}
    body = {"prompt": "Think:", "max_tokens": 40, "logprobs": 0, "response_format": grammar}
    r = post(evaluated, "/api/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["reasoning"] == "x" and choice["text"] == ""
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] in (["<|endoftext|>"], [END], ["<file_sep>"])


# -- 2. control tokens in prompts -----------------------------------------------------------------


def test_control_tokens_in_a_string_prompt_are_those_tokens(evaluated: Router) -> None:
    """The issue's figure: `<|im_start|>user\\nHi<|im_end|>` became 17 ordinary tokens. Parsed,
    it is five; a `special_tokens: plain` deployment still reads 17 characters' worth."""
    parsed = tokenize(evaluated, CHAT, return_token_strs=True)
    assert parsed["token_strs"] == ["<|im_start|>", "user", "\n", "Hi", END]
    assert parsed["tokens"][0] == 1 and parsed["tokens"][-1] == 2
    assert tokenize(evaluated, CHAT, model=PLAIN)["count"] == 17
    for model, count in ((MODEL, 5), (PLAIN, 17)):
        body = {"model": model, "prompt": CHAT, "max_tokens": 0, "echo": True, "logprobs": 0}
        r = post(evaluated, "/api/v1/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert r.json()["usage"]["prompt_tokens"] == count
        # Echo aligned: the tokens spell the prompt, each offset where its token starts.
        assert choice["text"] == CHAT == "".join(choice["logprobs"]["tokens"])
        offsets = [len("".join(choice["logprobs"]["tokens"][:i])) for i in range(count)]
        assert choice["logprobs"]["text_offset"] == offsets


def test_a_token_id_prompt_echoes_its_control_tokens_spelled_out(evaluated: Router) -> None:
    ids = tokenize(evaluated, CHAT)["tokens"]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = post(evaluated, "/api/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == CHAT


# -- 3. the tokenizer endpoints -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1", ""])
def test_tokenize_and_detokenize_under_every_prefix(evaluated: Router, prefix: str) -> None:
    r = post(evaluated, f"{prefix}/tokenize", {"prompt": "Hello world"})  # model: the default
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer == {
        "count": len(answer["tokens"]),
        "max_model_len": 2048,
        "tokens": answer["tokens"],
        "token_strs": None,
    }
    back = post(evaluated, f"{prefix}/detokenize", {"model": MODEL, "tokens": answer["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": "Hello world"}


def test_tokenize_counts_what_a_completion_counts(evaluated: Router) -> None:
    for prompt in ("Hello world", CHAT, "", "naïve café 東京 🙂"):
        counted = tokenize(evaluated, prompt)["count"]
        r = post(evaluated, "/api/v1/completions", {"prompt": prompt, "max_tokens": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == max(counted, 1)  # "" starts a new document


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(evaluated: Router) -> None:
    r = httpx.get(f"{evaluated.base}/tokenizer_info", headers=evaluated.headers(), timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["model"] == MODEL
    assert info["eos_token"] == END and info["bos_token"] == "<|im_start|>"
    assert "<|im_start|>" in info["chat_template"]
    assert info["model_max_length"] == 2048


def test_bad_tokenizer_requests_are_4xx_naming_the_field(evaluated: Router) -> None:
    assert_error(post(evaluated, "/tokenize", {"model": MODEL}), 400, "prompt")
    assert_error(post(evaluated, "/tokenize", {"prompt": "x", "messages": []}), 400, "messages")
    assert_error(post(evaluated, "/tokenize", {"prompt": "x", "model": "nope"}), 404, "model")
    assert_error(post(evaluated, "/tokenize", {"prompt": "x", "model": "fake/none"}), 400, "model")
    assert_error(post(evaluated, "/tokenize", {"prompt": "x", "model": ""}), 400, "model")
    assert_error(post(evaluated, "/detokenize", {"tokens": [1, -1]}), 400, "tokens[1]")
    assert_error(post(evaluated, "/detokenize", {"tokens": [1, 10**6]}), 400, "tokens[1]")
    r = httpx.post(f"{evaluated.base}/tokenize", content=b'{"prompt": "x"}', timeout=10)
    assert_error(r, 401)
    r = httpx.post(
        f"{evaluated.base}/tokenize",
        content=b"prompt=x",
        headers={"Authorization": f"Bearer {evaluated.key}"},
        timeout=10,
    )
    assert_error(r, 415, "content-type")
    r = httpx.get(f"{evaluated.base}/tokenize", headers=evaluated.headers(), timeout=10)
    assert_error(r, 405)
    r = httpx.get(
        f"{evaluated.base}/tokenizer_info?model={'x' * 300}", headers=evaluated.headers(), timeout=10
    )
    assert_error(r, 400, "model")


def test_tokenizer_requests_count_against_the_keys_limits(evaluated: Router) -> None:
    name = f"k-{uuid.uuid4().hex[:8]}"
    secret = evaluated.cli("keys", "create", "--name", name, "--rpm", "2").stdout.split()[-1]
    limited = {"Authorization": f"Bearer {secret}"}
    statuses = [
        httpx.post(f"{evaluated.base}/tokenize", headers=limited, json={"prompt": "x"}).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    name = f"k-{uuid.uuid4().hex[:8]}"
    only = evaluated.cli("keys", "create", "--name", name, "--models", "tok/vllm").stdout.split()[-1]
    r = httpx.post(
        f"{evaluated.base}/tokenize",
        headers={"Authorization": f"Bearer {only}"},
        json={"prompt": "x", "model": MODEL},
    )
    assert_error(r, 403, "model")


def test_upstream_tokenizers_vllm_and_llama_cpp(evaluated: Router, fake_upstream: str) -> None:
    httpx.post(f"{fake_upstream}/_reset")
    vllm = tokenize(evaluated, "hé", model="tok/vllm", return_token_strs=True)
    # The model's context length in the config wins over the upstream's 4096.
    assert vllm == {
        "count": 4,
        "max_model_len": 1000,
        "tokens": [256, 104, 195, 169],
        "token_strs": ["<s>", "h", "Ã", "©"],
    }
    llama = tokenize(evaluated, "hé", model="tok/llamacpp", add_special_tokens=False)
    assert llama == {"count": 3, "max_model_len": None, "tokens": [104, 195, 169], "token_strs": None}
    pieces = tokenize(evaluated, "h", model="tok/llamacpp", return_token_strs=True)
    assert pieces["token_strs"] == ["<s>", "h"]
    r = post(evaluated, "/detokenize", {"model": "tok/llamacpp", "tokens": [104, 105]})
    assert r.json() == {"prompt": "hi"}
    r = post(evaluated, "/detokenize", {"model": "tok/vllm", "tokens": [104, 105]})
    assert r.json() == {"prompt": "hi"}
    bodies = httpx.get(f"{fake_upstream}/_stats").json()["tokenizer_bodies"]
    assert bodies[0] == {
        "path": "/tokenize",
        "model": "ok",
        "prompt": "hé",
        "add_special_tokens": True,
        "return_token_strs": True,
    }
    assert bodies[1] == {
        "path": "/llamacpp/tokenize",
        "content": "hé",
        "add_special": False,
        "parse_special": True,
    }
    info = httpx.get(
        f"{evaluated.base}/v1/tokenizer_info?model=tok/vllm", headers=evaluated.headers()
    ).json()
    assert info == {
        "tokenizer_class": "FakeTokenizer",
        "bos_token": "<s>",
        "eos_token": "<s>",
        "model_max_length": 4096,
        "model": "tok/vllm",
    }
    r = httpx.get(f"{evaluated.base}/v1/tokenizer_info?model=tok/llamacpp", headers=evaluated.headers())
    assert_error(r, 400, "model")


def test_a_hostile_upstream_tokenizer_is_a_502_not_a_500(evaluated: Router) -> None:
    assert_error(post(evaluated, "/tokenize", {"model": "tok/nested", "prompt": "h"}), 502)
    # Nested, then ids no tokenizer has (and a negative context length): each is the upstream's
    # failure, and the last one's error is the answer.
    r = post(evaluated, "/tokenize", {"model": "tok/hostile", "prompt": "h"})
    assert "malformed" in assert_error(r, 502)["error"]["message"]


def test_tokenizer_info_passes_over_a_deployment_without_one(evaluated: Router) -> None:
    r = httpx.get(f"{evaluated.base}/tokenizer_info?model=tok/info-second", headers=evaluated.headers())
    assert r.status_code == 200, r.text
    assert r.json()["tokenizer_class"] == "FakeTokenizer"
    for query in ("model=", "model=tok/vllm&model=tok/llamacpp", "model=&model=tok/vllm"):
        r = httpx.get(f"{evaluated.base}/tokenizer_info?{query}", headers=evaluated.headers())
        assert_error(r, 400, "model")


def test_tokenizer_answers_carry_the_rate_limit_headers(evaluated: Router) -> None:
    name = f"k-{uuid.uuid4().hex[:8]}"
    secret = evaluated.cli("keys", "create", "--name", name, "--rpm", "50").stdout.split()[-1]
    r = httpx.post(
        f"{evaluated.base}/tokenize",
        headers={"Authorization": f"Bearer {secret}"},
        json={"prompt": "x"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit"] == "50"
    assert r.headers["x-ratelimit-remaining"] == "49"


def test_an_upstream_tokenizer_that_fails_passes_to_the_next_one(evaluated: Router) -> None:
    assert tokenize(evaluated, "h", model="tok/fallback")["tokens"] == [256, 104]
    # An upstream's 400 may be a limit of its own: the next one is asked, as for completions.
    assert tokenize(evaluated, "h", model="tok/refused")["tokens"] == [256, 104]
    r = post(evaluated, "/tokenize", {"model": "tok/refused-only", "prompt": "h"})
    assert assert_error(r, 400)["error"]["code"] == "upstream_rejected"


# -- lm-evaluation-harness, offline, against the router -------------------------------------------

CHAT_QUESTION = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
# (question, choices, answer, plain). Chat-formatted questions carry control tokens in the
# prompt, and after most of their answers end-of-text is the model's greedy next token (the
# issue's case); plain ones are text only.
QUESTIONS = [
    ("What is the capital of France? One word.", ["Paris.", "London.", "Rome."], 0, False),
    ("Is water wet? Answer yes or no.", ["Yes.", "No."], 0, False),
    ("What color is the sky on a clear day? One word.", ["Green.", "Blue.", "Red."], 1, False),
    ("How many legs does a cat have?", ["Four.", "Three.", "Eight."], 0, False),
    ("Say hello.", ["Hello! How can I help you today?", "Goodbye."], 0, False),
    ("Say thank you.", ["Thank you!", "No."], 0, False),
    ("The opposite of hot is", [" cold", " warm", " blue"], 0, True),
    ("One, two, three,", [" four", " seven"], 0, True),
]
MULTIPLE_CHOICE = [
    {"question": q, "choices": c, "answer": a, "plain": plain} for q, c, a, plain in QUESTIONS
]
GENERATE = [
    {"question": "What is 2+2? Answer with a number.", "target": "4"},
    {"question": "Name a primary color.", "target": "Red"},
    {"question": "Complete: The quick brown fox", "target": "jumps over the lazy dog"},
]
TASKS = """task: llmrouter_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {mc}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list: [{{metric: acc}}]
---
"""
GENERATE_TASK = """task: llmrouter_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {gen}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: target
generation_kwargs: {{until: ["\\n"], max_gen_toks: 24, do_sample: false, temperature: 0}}
metric_list: [{{metric: exact_match}}]
"""


def _lm_eval_dataset(folder: Path) -> None:
    def context(item: dict[str, Any]) -> str:
        return item["question"] if item.get("plain") else CHAT_QUESTION.format(question=item["question"])

    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({**i, "context": context(i)}) + "\n" for i in MULTIPLE_CHOICE))
    gen = folder / "gen.jsonl"
    gen.write_text("".join(json.dumps({**i, "context": context(i)}) + "\n" for i in GENERATE))
    (folder / "mc.yaml").write_text(TASKS.split("---")[0].format(mc=mc))
    (folder / "gen.yaml").write_text(GENERATE_TASK.format(gen=gen))


def _encode_pair(tokenize_: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens: trailing whitespace moves
    to the continuation, the whole is tokenized, the context's tokens come off the front."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenize_(context + continuation)
    head = tokenize_(context)
    return head, whole[len(head) :]


def test_lm_eval_scores_through_the_router_equal_the_models_own(
    evaluated: Router, direct: Any, tmp_path: Path
) -> None:
    """lm-evaluation-harness's `local-completions`, tokenizer from the router's /tokenize
    (`tokenizer_backend=remote`), offline: every loglikelihood equals llama-cpp-python's on the
    same file to 1e-6 (including answers after which end-of-text is the greedy token, which
    lost their last token before), and every generation is the model's greedy text."""
    _lm_eval_dataset(tmp_path)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OPENAI_API_KEY": evaluated.key,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    model_args = (
        f"base_url={evaluated.base}/v1/completions,model={MODEL},tokenizer_backend=remote,"
        f"auth_token={evaluated.key},max_retries=1,max_length=2048"
    )
    run = subprocess.run(
        [
            str(BIN / "lm_eval"),
            "--model", "local-completions",
            "--model_args", model_args,
            "--tasks", "llmrouter_mc,llmrouter_gen",
            "--include_path", str(tmp_path),
            "--output_path", str(out),
            "--log_samples",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {
        path.name.split("_")[1] + "_" + path.name.split("_")[2]: [
            json.loads(line) for line in path.read_text().splitlines()
        ]
        for path in out.rglob("samples_*.jsonl")
    }
    assert set(samples) == {"llmrouter_mc", "llmrouter_gen"}, list(out.rglob("*"))

    def tokens(text: str) -> list[int]:
        return list(direct.tokenize(text.encode(), add_bos=False, special=True))

    end_is_next = 0
    for sample in samples["llmrouter_mc"]:
        for pair, response in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = pair["arg_0"], pair["arg_1"]
            head, tail = _encode_pair(tokens, context, continuation)
            rows = logprobs_direct(direct, [*head, *tail])
            expected = sum(rows[len(head) + i - 1][t] for i, t in enumerate(tail))
            got = float(response[0][0])
            assert math.isclose(got, expected, abs_tol=1e-6), (context, continuation, got, expected)
            end_is_next += int(np.argmax(rows[-1])) in (0, 2, 4)
    assert end_is_next >= 8  # the dataset holds the case, many times
    for sample in samples["llmrouter_gen"]:
        prompt = tokens(sample["arguments"]["gen_args_0"]["arg_0"])
        ids, _ = greedy_direct(direct, prompt, 24)
        text = direct.detokenize([t for t in ids if t not in (0, 2, 4)]).decode()
        assert sample["resps"][0][0] == text.split("\n")[0].split(END)[0]
