"""Grammar-constrained decoding and fill-in-the-middle in the local engine, on the embedded model; and
the GBNF check, held to llama.cpp's own verdicts."""

from __future__ import annotations

import json
import math
import queue
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llama_cpp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp import Llama, llama_grammar

from llmrouter.errors import InvalidRequest
from llmrouter.providers._grammar import check_grammar, json_object_grammar, json_schema_grammar
from llmrouter.providers._llama_engine import (
    ChoiceDelta,
    ChoiceEnd,
    Engine,
    Job,
    JobUsage,
    Sampling,
    TokenInfo,
    _could_overlap,
)
from tests.fakes.gguf import FIM_MARKERS, with_fim_markers

END_TOKENS = (0, 2, 4)  # SmolLM2's end-of-generation tokens: <|endoftext|>, <|im_end|>, <reponame>
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


# -- the engine, driven as the llamacpp adapter drives it ---------------------------------------


def start(path: Path) -> Iterator[Engine]:
    engine = Engine("test", path, n_ctx=512, n_threads=1, max_queue=4)
    engine.start()
    engine.loaded.wait()
    assert engine.load_error is None
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def engine(gguf: Path) -> Iterator[Engine]:
    yield from start(gguf)


@pytest.fixture(scope="module")
def fim_engine(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf"
    with_fim_markers(gguf, path, FIM_MARKERS)
    yield from start(path)


@pytest.fixture(scope="module")
def vocab_model(gguf: Path) -> Llama:
    return Llama(model_path=str(gguf), vocab_only=True, verbose=False)


class Result:
    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.tokens: dict[int, list[TokenInfo]] = {}
        self.finish: dict[int, str] = {}
        self.completion_tokens = 0


def run(engine: Engine, prompt: str | tuple[int, ...], n: int = 1, **sampling: Any) -> Result:
    s = Sampling(**sampling)
    events: queue.Queue[object] = queue.Queue()
    engine.submit(Job(engine.prepare((prompt,), s, special=True), n, s, events.put))  # type: ignore[arg-type]
    result = Result()
    while (event := events.get(timeout=60)) is not None:
        if isinstance(event, ChoiceDelta):
            result.texts[event.index] = result.texts.get(event.index, "") + event.text
            result.tokens.setdefault(event.index, []).extend(event.tokens or [])
        elif isinstance(event, ChoiceEnd):
            result.finish[event.index] = event.finish_reason
            result.texts.setdefault(event.index, "")
        elif isinstance(event, JobUsage):
            result.completion_tokens = event.completion_tokens
        else:
            raise AssertionError(event)
    return result


# -- constrained decoding -----------------------------------------------------------------------


def test_every_choice_is_one_of_the_grammars_words(engine: Engine) -> None:
    grammar = 'root ::= "yes" | "no"'
    for seed in range(4):
        r = run(
            engine, "Is the sea salty?", n=2, max_tokens=5, temperature=1.0, seed=seed, grammar=grammar
        )
        assert set(r.texts.values()) <= {"yes", "no"} and set(r.finish.values()) == {"stop"}


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (1.0, 1.0), (1.0, 0.8)])
def test_json_object_output_is_a_json_object(engine: Engine, temperature: float, top_p: float) -> None:
    r = run(
        engine,
        "A cat, as JSON:",
        n=2,
        max_tokens=100,
        temperature=temperature,
        top_p=top_p,
        seed=1,
        grammar=json_object_grammar(),
    )
    assert "stop" in r.finish.values()  # a choice cut by max_tokens is the start of an object
    for i, text in r.texts.items():
        assert r.finish[i] == "length" or isinstance(json.loads(text), dict)


def test_json_schema_output_validates(engine: Engine) -> None:
    r = run(
        engine,
        "A person:",
        n=3,
        max_tokens=60,
        temperature=0.9,
        seed=1,
        grammar=json_schema_grammar(PERSON),
    )
    assert set(r.finish.values()) == {"stop"}
    for text in r.texts.values():
        jsonschema.validate(json.loads(text), PERSON)


def test_constrained_draws_follow_the_models_distribution_over_allowed_tokens(engine: Engine) -> None:
    """Most draws here are refused by the grammar and drawn again from the allowed tokens: the
    result must still be the model's own probabilities (from logprobs), renormalised over them."""
    draws = 500
    r = run(
        engine,
        "Is the sky green? Answer yes or no.\nAnswer:",
        n=draws,
        max_tokens=1,
        temperature=1.0,
        seed=5,
        logprobs=0,
        grammar='root ::= " yes" | " no" | " maybe"',
    )
    firsts = [r.tokens[i][0] for i in range(draws)]
    counts = Counter(t.token for t in firsts)
    p = {t.token: math.exp(t.logprob or -math.inf) for t in firsts}
    expected = {token: draws * mass / sum(p.values()) for token, mass in p.items()}
    chi2 = sum((counts[t] - e) ** 2 / e for t, e in expected.items() if e >= 5)
    assert len(counts) >= 3 and chi2 < 13.8  # p = 0.001 for the two degrees of freedom seen here


def test_the_end_waits_until_the_grammar_is_complete(engine: Engine) -> None:
    eager = {t: 100.0 for t in END_TOKENS}
    assert run(engine, "Say hi:", max_tokens=8, temperature=0, logit_bias=eager).texts[0] == ""
    grammar = 'root ::= "hello world"'
    r = run(engine, "Say hi:", max_tokens=16, temperature=0, logit_bias=eager, grammar=grammar)
    assert (r.texts[0], r.finish[0]) == ("hello world", "stop")


def test_a_complete_grammar_that_allows_nothing_more_ends_the_choice(engine: Engine) -> None:
    reluctant = {t: -100.0 for t in END_TOKENS}
    r = run(
        engine, "Say yes:", max_tokens=8, temperature=0, logit_bias=reluctant, grammar='root ::= "yes"'
    )
    assert (r.texts[0], r.finish[0]) == ("yes", "stop")


def test_max_tokens_still_cuts_a_constrained_choice(engine: Engine) -> None:
    r = run(engine, "Count:", max_tokens=3, temperature=0, grammar='root ::= ("a" | "b" | " ")+ "."')
    assert r.finish[0] == "length" and r.completion_tokens == 3


def test_seeds_give_the_same_text_under_a_grammar(engine: Engine) -> None:
    body: dict[str, Any] = {"max_tokens": 40, "temperature": 1.0, "seed": 11}
    grammar = json_object_grammar()
    first = run(engine, "A dog, as JSON:", n=2, grammar=grammar, **body).texts
    again = run(engine, "A dog, as JSON:", n=2, grammar=grammar, **body).texts
    assert first == again and first[0] != first[1]


def test_logprob_tokens_spell_the_constrained_text(engine: Engine) -> None:
    """...up to the end-of-text token that ended it: listed (and counted), but not in the text."""
    r = run(engine, "A dog:", max_tokens=30, temperature=0, logprobs=2, grammar=json_object_grammar())
    assert r.finish[0] == "stop" and r.tokens[0][-1].token == "<|endoftext|>"
    assert r.tokens[0][-1].offset == len("A dog:") + len(r.texts[0])
    assert "".join(t.token for t in r.tokens[0][:-1]) == r.texts[0]
    assert len(r.tokens[0]) == r.completion_tokens
    assert all(t.logprob is not None and t.logprob <= 0 for t in r.tokens[0])


def test_a_control_token_is_spelt_out_as_the_grammar_matched_it(engine: Engine) -> None:
    r = run(engine, "x", max_tokens=2, temperature=0, grammar="root ::= <|im_start|>")
    assert (r.texts[0], r.finish[0]) == ("<|im_start|>", "stop")


def test_a_grammar_naming_a_token_the_model_lacks_is_refused_before_it_runs(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match=r"invalid token '<\|nope\|>'.*line 1, column 10"):
        engine.prepare(("x",), Sampling(max_tokens=2, grammar="root ::= <|nope|>"), special=True)


# -- the grammar check, against llama.cpp ------------------------------------------------------

VALID = [
    llama_grammar.JSON_GBNF,
    llama_grammar.JSON_ARR_GBNF,
    llama_grammar.ARITHMETIC_GBNF,
    llama_grammar.C_GBNF,
    llama_grammar.CHESS_GBNF,
    llama_grammar.JAPANESE_GBNF,
    llama_grammar.LIST_GBNF,
    json_object_grammar(),
    json_schema_grammar(PERSON),
    'root ::= "yes" | "no"',
    'root ::= ""',
    "root ::= <|im_start|> !<|im_end|>* <[2]>",
    'root ::= item{2,4} ("," item){0,3}\r\nitem ::= [a-z\\-\\]]+ | "\\u00e9" | "\\U0001F600"\r\n',
    'root ::= (\n  "a" |\n  "b"  # a comment\n)+ tail?\ntail ::= . [^\\n]*',
    'root ::= x x\nx ::= "a" | root-2\nroot-2 ::= "b"{3}',
]

# (grammar, what llama.cpp says, line, column, character offset)
INVALID = [
    ('root = "yes"', "expecting ::=", 1, 6, 5),
    ('root ::= "yes" | "no', "unexpected end of input", 1, 21, 20),
    ("root ::= [a-z", "unexpected end of input", 1, 14, 13),
    ('root ::= ( "a" | "b"', "expecting ')'", 1, 21, 20),
    ('root ::= "a"\nitem ::= "\\q"', "unknown escape", 2, 11, 23),
    ('root ::= item\nitem ::= "x" ]', "expecting newline or end", 2, 14, 27),
    ('root ::= "a"{2', "expecting ','", 1, 15, 14),
    ('root ::= "a"{,2}', "expecting an int", 1, 14, 13),
    ('root ::= *"a"', "expecting preceding item", 1, 10, 9),
    ('root ::= "\\x4"', "expecting 2 hex chars", 1, 13, 12),
    ("root ::= <[99999999999]>", "parsed token id is too big", 1, 12, 11),
    ('root ::= "a"{2001}', "number of repetitions exceeds sane defaults", 1, 13, 12),
    ("root ::= answer\n\nanswer ::= yes", "Undefined rule identifier 'yes'", 3, 12, 28),
    ("root ::= 'a'", "expecting newline or end", 1, 10, 9),
    ('root ::= root "a" | "b"', "rule 'root' is left-recursive", 1, 1, 0),
]
UNPLACED = [('answer ::= "yes"', "no rule named 'root'"), ("  # only a comment\n", "defines no rules")]
# Grammars llama.cpp takes and then never finishes with: only the check stands between them and it.
STRICTER = [
    ('root ::= "a"{5,2}', "maximum 2 is below its minimum 5", 1, 13, 12),
    ('root ::= a root "y" | "x"\na ::= c\nc ::= ', "rule 'root' is left-recursive", 1, 1, 0),
    ('root ::= "a\0"', "a NUL character", 1, 12, 11),
]


@pytest.fixture(scope="module")
def llama_accepts(vocab_model: Llama) -> Callable[[str], bool]:
    """llama.cpp's verdict: whether its grammar sampler can be made from the text."""

    def accepts(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(
            vocab_model._model.vocab, grammar.encode(), b"root"
        )
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    return accepts


@pytest.fixture(scope="module")
def is_token(vocab_model: Llama) -> Callable[[str], bool]:
    return lambda text: len(vocab_model.tokenize(text.encode(), add_bos=False, special=True)) == 1


def our_verdict(grammar: str, is_token: Callable[[str], bool]) -> str | None:
    """None when the check takes the grammar, else its message (for the `grammar` parameter)."""
    try:
        check_grammar(grammar, is_token=is_token)
    except InvalidRequest as exc:
        return exc.message if exc.param == "response_format.grammar" else f"param {exc.param}"
    return None


@pytest.mark.parametrize("grammar", VALID)
def test_grammars_llama_cpp_takes_are_taken(
    grammar: str, is_token: Callable[[str], bool], llama_accepts: Callable[[str], bool]
) -> None:
    assert llama_accepts(grammar)
    assert our_verdict(grammar, is_token) is None


@pytest.mark.parametrize(("grammar", "reason", "line", "column", "offset"), INVALID + STRICTER)
def test_broken_grammars_are_refused_saying_where(
    grammar: str,
    reason: str,
    line: int,
    column: int,
    offset: int,
    is_token: Callable[[str], bool],
    llama_accepts: Callable[[str], bool],
) -> None:
    message = our_verdict(grammar, is_token)
    assert message is not None and reason in message
    assert f"line {line}, column {column} (character {offset})" in message
    if (grammar, reason, line, column, offset) in INVALID:
        assert not llama_accepts(grammar)


@pytest.mark.parametrize(("grammar", "reason"), UNPLACED)
def test_grammars_without_a_root_are_refused(
    grammar: str, reason: str, is_token: Callable[[str], bool], llama_accepts: Callable[[str], bool]
) -> None:
    message = our_verdict(grammar, is_token)
    assert message is not None and reason in message
    assert not llama_accepts(grammar)


def test_mangled_grammars_get_llama_cpps_verdict(
    is_token: Callable[[str], bool], llama_accepts: Callable[[str], bool]
) -> None:
    """Random edits of valid grammars: whatever llama.cpp takes is taken, whatever it refuses is
    refused (but for what the check refuses on purpose, which llama.cpp would hang on)."""
    rng = random.Random(7)
    pieces = [*'"[]()|*+?{},.:=<>!^-\\#\n\t \r', "::=", "root", "\\x", "{5,2}", "<[5]>", "<|im_end|>"]
    taken = 0
    for _ in range(600):
        grammar = rng.choice(VALID)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(grammar) + 1)
            if rng.random() < 0.5:
                grammar = grammar[:at] + grammar[at + 1 :]
            else:
                grammar = grammar[:at] + rng.choice(pieces) + grammar[at:]
        ours = our_verdict(grammar, is_token)
        if ours is not None and ("left-recursive" in ours or "below its minimum" in ours):
            continue
        assert (ours is None) == llama_accepts(grammar), (grammar, ours)
        taken += ours is None
    assert 50 < taken < 550  # both kinds of verdict were tried


def test_the_check_needs_no_llama_cpp() -> None:
    code = (
        "import sys; from llmrouter.providers._grammar import check_grammar, json_object_grammar\n"
        "check_grammar(json_object_grammar()); assert 'llama_cpp' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "frobnicate"}, "Unrecognized schema"),
        ({"$ref": "#/definitions/missing"}, "Error resolving ref"),
        ({"$ref": "other.json"}, "Unsupported ref"),
    ],
)
def test_a_schema_that_cannot_be_converted_is_refused(schema: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason) as caught:
        json_schema_grammar(schema)
    assert caught.value.param == "response_format.json_schema.schema"


# -- fill-in-the-middle -------------------------------------------------------------------------


def test_a_model_without_fim_tokens_refuses_a_suffix(engine: Engine) -> None:
    assert not engine.has_fim
    with pytest.raises(InvalidRequest, match="does not support suffix") as caught:
        engine.prepare(("def f():",), Sampling(max_tokens=4, suffix="\n"), special=True)
    assert caught.value.param == "suffix"


def test_the_prompt_is_laid_out_for_fill_in_the_middle(fim_engine: Engine, vocab_model: Llama) -> None:
    assert fim_engine.has_fim
    prefix, suffix = "def add(a, b):\n    ", "\n    return total\n"
    prefix_tokens = vocab_model.tokenize(prefix.encode(), add_bos=False, special=False)
    suffix_tokens = vocab_model.tokenize(suffix.encode(), add_bos=False, special=False)
    pre, suf, mid = FIM_MARKERS
    expected = [pre, *prefix_tokens, suf, *suffix_tokens, mid]
    s = Sampling(max_tokens=4, suffix=suffix)
    for prompt in (prefix, tuple(prefix_tokens)):
        [prepared] = fim_engine.prepare((prompt,), s, special=True)  # type: ignore[arg-type]
        assert prepared.tokens == expected and prepared.text == prefix


def test_fill_in_the_middle_writes_a_middle_and_echoes_the_prefix_only(fim_engine: Engine) -> None:
    prefix, suffix = "The capital of France is", " It is a big city."
    body: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "suffix": suffix}
    body["logit_bias"] = {t: -100.0 for t in END_TOKENS}  # this model was not trained to infill
    middle = run(fim_engine, prefix, **body)
    assert middle.completion_tokens == 6 and middle.texts[0].strip()
    echoed = run(fim_engine, prefix, echo=True, logprobs=1, **body)
    assert echoed.texts[0] == prefix + middle.texts[0]
    infos = echoed.tokens[0]
    assert "".join(t.token for t in infos) == echoed.texts[0] and infos[0].offset == 0
    assert infos[0].logprob is not None  # the prefix's first token follows the prefix marker


# -- JSON Schema through llguidance ----------------------------------------------------------------

WIDE_RANGE = {
    "type": "object",
    "properties": {
        "year": {"type": "integer", "minimum": 2000, "maximum": 3999},
        "step": {"type": "integer", "multipleOf": 5, "minimum": 5, "maximum": 95},
        "tags": {
            "type": "object",
            "patternProperties": {"^t[0-9]$": {"type": "boolean"}},
            "additionalProperties": False,
            "maxProperties": 2,
        },
    },
    "required": ["year", "step", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_llguidance_constrains_what_llama_cpps_converter_ignores(
    engine: Engine, temperature: float
) -> None:
    # llama-cpp-python's converter ignores a wide integer range, multipleOf and patternProperties
    # (bench/schema_coverage.py); under llguidance's grammar the answer validates anyway.
    import msgspec
    from llguidance import LLMatcher

    from llmrouter.structured import gbnf_for
    from llmrouter.wire.completions import CompletionCreateParams

    grammar = LLMatcher.grammar_from_json_schema(WIDE_RANGE)
    for seed in range(3):
        out = run(
            engine, "A record:\n", max_tokens=120, temperature=temperature, seed=seed, guidance=grammar
        )
        assert out.finish[0] == "stop", out.texts
        jsonschema.validate(json.loads(out.texts[0]), WIDE_RANGE)
    params = msgspec.convert(
        {
            "prompt": "x",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": WIDE_RANGE},
            },
        },
        CompletionCreateParams,
    )
    gbnf = gbnf_for(params.response_format)
    assert "2000" not in gbnf and "multipleOf" not in gbnf  # the converter: no trace of them


# -- hostile grammars: bounded, and never a RecursionError ---------------------------------------


@pytest.mark.parametrize("groups", [65, 490, 5000])
def test_groups_nested_too_deeply_are_refused_saying_where(groups: int) -> None:
    grammar = "root ::= " + "(" * groups + '"a"' + ")" * groups
    with pytest.raises(InvalidRequest) as caught:
        check_grammar(grammar, max_depth=64)
    assert caught.value.param == "response_format.grammar"
    assert "nested deeper than 64" in caught.value.message
    assert "(character 73)" in caught.value.message
    check_grammar("root ::= " + "(" * 64 + '"a"' + ")" * 64, max_depth=64)


def test_without_a_depth_given_the_check_still_stops_short_of_the_recursion_limit() -> None:
    with pytest.raises(InvalidRequest, match="nested deeper than 256"):
        check_grammar("root ::= " + "(" * 5000 + '"a"' + ")" * 5000)


def test_the_left_recursion_check_takes_time_in_proportion_to_the_grammar() -> None:
    """Each rule refers to the one before, defined earlier: the nullable rules' fixed point took
    one pass per rule (3.8 s for 62 kB; a minute for 256 kB). The bound is 20 times what the
    linear check takes: it catches the quadratic, not a slow machine."""
    n = 15_000
    text = f'root ::= r{n - 1}\nr0 ::= ""\n' + "".join(f"r{i} ::= r{i - 1}\n" for i in range(1, n))
    assert len(text) < 256 * 1024
    started = time.perf_counter()
    check_grammar(text)
    assert time.perf_counter() - started < 10


# -- reading control tokens in a prompt -----------------------------------------------------------

_PROMPT_PIECES = [
    *("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<filename>", "<empty_output>"),
    *("user", "assistant", "\n", " ", "  ", "Hi", "é", "東京", "🙂", "x"),
    *("<|im", "_start|>", "<", ">", "|", "<|", "|>", "<|im_end", "<filename"),
]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_PROMPT_PIECES), max_size=14), st.booleans())
def test_a_prompt_reads_control_tokens_as_llama_cpps_parse_special_does(
    engine: Engine, pieces: list[str], bos: bool
) -> None:
    text = "".join(pieces)
    ours = engine._tokenize_prompt(text, bos=bos, special=True)
    theirs = engine._llm.tokenize(text.encode(), add_bos=bos, special=True)
    assert ours == list(theirs)
    assert engine._tokenize_prompt(text, bos=bos, special=False) == list(
        engine._llm.tokenize(text.encode(), add_bos=bos, special=False)
    )


def test_reading_control_tokens_costs_about_what_plain_text_does(engine: Engine) -> None:
    """llama.cpp's own parse_special is quadratic: 25 s for 520 KB of `<|im_start|>x`, where the
    same text read as plain characters takes 0.3 s. Cut in one pass, it costs a small multiple
    of that (a ratio in one run, not a timing)."""
    text = "".join(f"<|im_start|>{i}" for i in range(50_000))  # 790 KB, every piece different
    took = []
    for special in (True, False, True, False):
        started = time.perf_counter()
        engine._tokenize_prompt(text, bos=False, special=special)
        took.append(time.perf_counter() - started)
    assert min(took[0], took[2]) < 10 * max(took[1], took[3]), took


def test_fill_in_the_middle_reads_its_prefix_and_suffix_as_plain_text(fim_engine: Engine) -> None:
    """No prompt can write the markers that lay out fill-in-the-middle itself."""
    s = Sampling(max_tokens=1, suffix="c<|im_end|>")
    [prepared] = fim_engine.prepare(("a<|im_start|>b",), s, special=True)
    assert 1 not in prepared.tokens[1:-1] and 2 not in prepared.tokens
    assert fim_engine._text(prepared.tokens).count("<|im_start|>") == 1


def test_special_texts_that_could_overlap_are_left_to_llama_cpp() -> None:
    assert _could_overlap({b"ab": 1, b"bers": 2})
    assert not _could_overlap({b"<|im_start|>": 1, b"<|im_end|>": 2, b"aa": 3})
