"""What the chat fakes answer, before any wire format: the deterministic model of tests/fakes/lm.py
asked through a neutral request (a prompt text and the sampling parameters every chat API has),
its candidates cut at the output cap and the stop sequences here, so that a fake can tell which
stop sequence ended a candidate (Anthropic names it).

`ok` answers "Hello from fake" (three tokens); `lm`, `lm-*` are the lm.py model and its variants
(lm-no-PARAM rejects PARAM by its Completions name: the fakes translate their own fields first).
Temperature 0 without a seed is greedy, hence deterministic: the seed is then fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    from tests.fakes import lm
except ImportError:  # run as a script: python tests/fakes/gemini.py PORT
    import lm  # type: ignore[no-redef]

REASONING = ["Pondering", " the", " question", "."]
OK = (["Hello", " from", " fake"], [-0.1, -0.2, -0.3])


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None  # None: the model's own default (lm's 16)
    stops: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    temperature: float | None = None
    top_logprobs: int | None = None  # None: no logprobs asked; 0: the chosen tokens only
    json: dict[str, Any] | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}
    greedy: bool = False  # the same prompt, the same answer (as temperature 0 without a seed)


@dataclass
class Candidate:
    tokens: list[str]
    logprobs: list[float]
    tops: list[list[tuple[str, float]]]  # per token: the k likeliest, the chosen one first
    finish: str  # "stop", "length" or "stop_sequence"
    stop_sequence: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class Answer:
    candidates: list[Candidate]
    prompt_tokens: int
    reasoning: list[str] = field(default_factory=list)  # one list for all candidates

    @property
    def output_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.candidates) + len(self.reasoning)


def token_id(token: str) -> int:
    """The token's id in lm's vocabulary (its index in WORDS), 0 for any other text."""
    return lm.WORDS.index(token) if token in lm.WORDS else 0


def answer(model: str, prompt: str, sampling: Sampling, *, reasoning: bool = False) -> Answer:
    """`model` is `ok` or an lm variant; raises lm.Rejected when an lm-no-PARAM variant lacks a
    parameter that `sampling` sets."""
    thought = list(REASONING) if reasoning else []
    if not (model == "lm" or model.startswith("lm-")):
        tokens, values = OK
        fixed = [
            _cut(list(tokens), list(values), [[]] * len(tokens), "stop", sampling)
            for _ in range(sampling.n)
        ]
        return Answer(fixed, lm.prompt_length(prompt), thought)
    body: dict[str, Any] = {"prompt": prompt}
    if sampling.n != 1:
        body["n"] = sampling.n
    if sampling.max_tokens is not None:
        body["max_tokens"] = sampling.max_tokens
    if sampling.stops:
        body["stop"] = list(sampling.stops)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.top_logprobs is not None:
        body["logprobs"] = sampling.top_logprobs
    if sampling.json is not None:
        body["response_format"] = sampling.json
    if sampling.temperature is not None:
        body["temperature"] = sampling.temperature
    lm.check(model, body)  # what the client sent, before what the fake adds to ask lm
    body.pop("stop", None)  # cut here, to know which one matched
    if sampling.seed is None and (sampling.temperature == 0 or sampling.greedy):
        body["seed"] = 0
    body["logprobs"] = sampling.top_logprobs or 0
    generated = lm.complete("lm" if model.startswith("lm-no-") else model, body)
    candidates = []
    for choice in generated["choices"]:
        lp = choice["logprobs"]
        tops = [list(t.items()) for t in lp["top_logprobs"]] if lp["top_logprobs"] else None
        tokens = list(lp["tokens"])
        values = [float(v) for v in lp["token_logprobs"]]
        candidates.append(
            _cut(tokens, values, tops or [[]] * len(tokens), choice["finish_reason"], sampling)
        )
    return Answer(candidates, generated["usage"]["prompt_tokens"], thought)


def _cut(
    tokens: list[str],
    values: list[float],
    tops: list[list[tuple[str, float]]],
    finish: str,
    sampling: Sampling,
) -> Candidate:
    """The candidate at most `max_tokens` long, ended at its first stop sequence (not included)."""
    if sampling.max_tokens is not None and len(tokens) > sampling.max_tokens:
        tokens, finish = tokens[: sampling.max_tokens], "length"
    text = "".join(tokens)
    found = [(text.find(s), s) for s in sampling.stops if s and s in text]
    if not found:
        return Candidate(tokens, values[: len(tokens)], tops[: len(tokens)], finish)
    at, stop = min(found)
    kept: list[str] = []
    length = 0
    for token in tokens:
        if length >= at:
            break
        kept.append(token[: at - length])
        length += len(token)
    kept = [t for t in kept if t]
    return Candidate(kept, values[: len(kept)], tops[: len(kept)], "stop_sequence", stop)


# -- tools ----------------------------------------------------------------------------------------
# With tools declared, the fakes call them until the conversation holds their results: each tool
# once (only the first, or the one named, when at most one call is allowed), arguments made from
# its parameters' schema; with the results in, they answer in words that quote them.

TOOL_ARGUMENTS = {"string": "Paris", "integer": 3, "number": 2.5, "boolean": True}


@dataclass(frozen=True)
class Declared:
    name: str
    parameters: dict[str, Any]  # JSON Schema


@dataclass(frozen=True)
class Calls:
    """Which tools to call now: (name, arguments) each."""

    calls: list[tuple[str, dict[str, Any]]]


def tool_turn(
    tools: list[Declared], *, choice: str | None, parallel: bool, answered: bool
) -> Calls | None:
    """The calls this turn makes, or None to answer in words. `choice` is "none", "auto",
    "required" or a tool's name; `answered`: the last turn holds tool results."""
    if not tools or choice == "none" or (answered and choice in (None, "auto")):
        return None
    named = [t for t in tools if t.name == choice]
    chosen = named or (tools if parallel else tools[:1])
    return Calls([(t.name, arguments_for(t.parameters)) for t in chosen])


def arguments_for(schema: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    return {
        name: TOOL_ARGUMENTS.get(str(prop.get("type")), "x")
        for name, prop in properties.items()
        if name in (schema.get("required") or list(properties))
    }


def results_text(results: list[str]) -> str:
    """The words that follow tool results: they quote them."""
    return "The tools said: " + "; ".join(results)


def spoken(text: str, prompt_tokens: int) -> Answer:
    """An answer of fixed words (after tool results), as one candidate that stopped."""
    tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
    return Answer([Candidate(tokens, [-0.5] * len(tokens), [[]] * len(tokens), "stop")], prompt_tokens)


def call_id(prefix: str, turn: int, k: int) -> str:
    return f"{prefix}{turn:04d}{k:02d}"
