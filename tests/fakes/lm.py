"""A deterministic language model behind the fake upstream, honouring the Completions API exactly.

It "generates" words from a fixed vocabulary (token id = index in `WORDS`), so every parameter has
a checkable effect: `n`, `best_of` (by mean logprob), `echo` (the prompt's words, first logprob
null), `logprobs`, `stop`, `suffix`, `seed`, `logit_bias`, token-id prompts, `response_format`
(json_object and json_schema: an object with the schema's required properties), `stream` with usage.

Model names choose a variant:
  lm                 everything above
  lm-no-PARAM        answers 400 if the request sets PARAM (so a test proves the router did not
                     send it): n, best_of, echo, stop, stream, logprobs, suffix, seed, logit_bias,
                     response_format, prompt (token-id prompts)
  lm-think           each completion starts with `<think>pondering deeply</think>\\n`
  lm-json-second     text that is not JSON on odd calls, a JSON object on even ones
  lm-never-json      never JSON (and never Python)
  lm-chain           each word chosen by the text so far (prompt and completion), and nothing
                     else: sent the prompt and the start of its answer, it continues that answer
                     exactly as it would have (for resumed streams); max_tokens and stop only
"""

from __future__ import annotations

import json
import random
import re
import zlib
from typing import Any

WORDS = [
    " alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta", " iota", " kappa",
    " lambda", " mu", " nu", " xi", " omicron", " pi", " rho", " sigma", " tau", " upsilon",
]  # fmt: skip
CODE = ["z", " =", " y", " +", " 1", "\n"]
DEFAULT_MAX_TOKENS = 16
UNBOUNDED_TOKENS = 40  # max_tokens: null
_calls: dict[str, int] = {}


def reset() -> None:
    _calls.clear()


class Rejected(Exception):
    """The variant does not support a parameter the request set: a 400."""


def _lacks(model: str, body: dict[str, Any]) -> None:
    if not model.startswith("lm-no-"):
        return
    param = model.removeprefix("lm-no-").replace("-", "_")
    if param == "prompt":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            raise Rejected("only one string prompt at a time")
        return
    value = body.get(param)
    if value is not None and value is not False:
        raise Rejected(f"unsupported parameter: {param}")


def _prompts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return ["".join(WORDS[t % len(WORDS)] for t in prompt)]
    if prompt and isinstance(prompt[0], list):
        return ["".join(WORDS[t % len(WORDS)] for t in p) for p in prompt]
    return list(prompt)


def _prompt_tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


def prompt_length(text: str) -> int:
    """The prompt's length in tokens, as `usage.prompt_tokens` counts it."""
    return len(_prompt_tokens(text))


def check(model: str, body: dict[str, Any]) -> None:
    """Raises Rejected if the variant lacks a parameter `body` sets (complete() checks it first)."""
    _lacks(model, body)


def _value_for(schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _value_for(props.get(k, {})) for k in schema.get("required", [])}
    return {"string": "alpha", "integer": 1, "number": 1.5, "boolean": True, "array": []}.get(str(kind))


def _generate(
    model: str, body: dict[str, Any], prompt: str, j: int, rng: random.Random
) -> tuple[list[str], list[float], str]:
    """One candidate: its tokens, their logprobs, and the finish reason."""
    limit = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    limit = UNBOUNDED_TOKENS if limit is None else limit
    fmt = body.get("response_format") or {}
    calls = _calls[model] = _calls.get(model, 0) + 1
    if model == "lm-json-second":
        text = '{"ok": true}' if calls % 2 == 0 else "not json at all"
        return [text], [-0.5], "stop"
    if model == "lm-never-json":
        return ["{never"], [-0.5], "stop"
    if model == "lm-chain":
        chain: list[str] = []
        for _ in range(limit):
            chain.append(WORDS[zlib.crc32((prompt + "".join(chain)).encode()) % len(WORDS)])
        return chain, [-0.1] * len(chain), "length"
    grammar = fmt.get("grammar") if fmt.get("type") == "grammar" else body.get("grammar")
    if grammar:  # not a GBNF engine: it says the grammar's first literal, enough for tests
        literal = re.search(r'"([^"]*)"', grammar)
        return [literal.group(1) if literal else ""], [-0.2], "stop"
    if fmt.get("type") == "json_object":
        return ['{"word": "alpha"}'], [-0.2], "stop"
    if fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema", {}).get("schema", {})
        return [json.dumps(_value_for(schema))], [-0.2], "stop"
    if '{"' in prompt:  # shown JSON, it answers in JSON, as a model would unconstrained
        return ['{"city":', ' "alpha"}'], [-0.3, -0.2], "stop"
    seed = body.get("seed")
    if seed is not None:
        start = zlib.crc32(f"{seed}/{j}/{prompt}".encode()) % len(WORDS)
    else:
        start = rng.randrange(len(WORDS))
    bias = {int(k): v for k, v in (body.get("logit_bias") or {}).items()}
    forced = [t for t, v in bias.items() if v >= 100]
    tokens: list[str] = []
    logprobs: list[float] = []
    if model == "lm-think":
        tokens = ["<think>", "pondering", " deeply", "</think>", "\n"]
        if prompt.endswith("<think>"):  # the prompt opened the tag already
            tokens = tokens[1:]
        logprobs = [-0.1] * len(tokens)
    words = CODE if prompt.endswith("\n") else WORDS  # a code prompt gets code, from its start
    if words is CODE:
        start = 0
    for i in range(limit):
        word = (start + i) % len(words)
        if forced:
            word = forced[0]
        while bias.get(word, 0) <= -100:
            word = (word + 1) % len(WORDS)
        tokens.append(words[word] if words is CODE else WORDS[word])
        logprobs.append(-0.1 * ((start + j) % 7 + 1) - 0.01 * i)
    return tokens, logprobs, "length"


def _stop_at(text: str, stops: list[str]) -> int:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else -1


def _choice(
    model: str, body: dict[str, Any], prompt: str, index: int, j: int, rng: random.Random
) -> tuple[dict[str, Any], int]:
    tokens, values, finish = _generate(model, body, prompt, j, rng)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    text = "".join(tokens)
    cut = _stop_at(text, stops)
    if cut >= 0:
        kept, length = [], 0
        for token in tokens:
            if length >= cut:
                break
            kept.append(token[: cut - length])
            length += len(token)
        tokens, values, finish, text = kept, values[: len(kept)], "stop", text[:cut]
    count = len(tokens)
    k = body.get("logprobs")
    out_tokens, out_values = list(tokens), list(values)
    first: list[float | None] = []
    if body.get("echo"):
        head = _prompt_tokens(prompt)
        out_tokens = head + out_tokens
        first = [None] + [-1.0] * (len(head) - 1)
        text = prompt + text
    logprobs = None
    if k is not None:
        all_values: list[float | None] = [*first, *out_values]
        offsets, at = [], 0
        for token in out_tokens:
            offsets.append(at)
            at += len(token)
        logprobs = {
            "tokens": out_tokens,
            "token_logprobs": all_values,
            "top_logprobs": [
                None if v is None else _top(t, v, k) for t, v in zip(out_tokens, all_values, strict=True)
            ]
            if k
            else None,
            "text_offset": offsets,
        }
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
    return choice, count


def _top(token: str, value: float, k: int) -> dict[str, float]:
    """k entries: the token itself and the next words, less likely."""
    others = [w for w in WORDS if w != token][: k - 1]
    return {token: value, **{w: value - 1 - n for n, w in enumerate(others)}}


def complete(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """The whole answer; raises Rejected for a parameter the variant lacks."""
    _lacks(model, body)
    prompts = _prompts(body.get("prompt", ""))
    n = body.get("n") or 1
    best_of = body.get("best_of") or n
    rng = random.Random()
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for p, prompt in enumerate(prompts):
        candidates = []
        for j in range(best_of):
            choice, count = _choice(model, body, prompt, p * n + j, j, rng)
            completion_tokens += count
            candidates.append(choice)
        if best_of > n:
            candidates.sort(key=_mean, reverse=True)
        for j, choice in enumerate(candidates[:n]):
            choice["index"] = p * n + j
            if best_of > n and body.get("logprobs") is None:
                choice["logprobs"] = None
            choices.append(choice)
    prompt_tokens = sum(len(_prompt_tokens(p)) for p in prompts)
    return {
        "id": "cmpl-lm",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "system_fingerprint": "fp_lm",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _mean(choice: dict[str, Any]) -> float:
    values = [v for v in (choice["logprobs"] or {}).get("token_logprobs", []) if v is not None]
    return sum(values) / len(values) if values else float("-inf")


def chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The answer as stream chunks: one token each, then each choice's finish, then usage."""
    out: list[dict[str, Any]] = []
    base = {k: answer[k] for k in ("id", "object", "created", "model")}
    for choice in answer["choices"]:
        lp = choice["logprobs"]
        pieces = lp["tokens"] if lp else re.findall(r"\s*\S+|\s+", choice["text"])
        for i, token in enumerate(pieces):
            piece_lp = None
            if lp:
                piece_lp = {
                    "tokens": [token],
                    "token_logprobs": [lp["token_logprobs"][i]],
                    "top_logprobs": [lp["top_logprobs"][i]] if lp["top_logprobs"] else None,
                    "text_offset": [lp["text_offset"][i]],
                }
            c = {"text": token, "index": choice["index"], "logprobs": piece_lp, "finish_reason": None}
            out.append({**base, "choices": [c]})
        end = {"text": "", "index": choice["index"], "logprobs": None}
        out.append({**base, "choices": [{**end, "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        out.append({**base, "choices": [], "usage": answer["usage"]})
    return out
