"""The per-choice shaping every answer goes through: echo, reasoning, stops, logprob alignment."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from llmrouter.emulation.choices import ChoiceShaper, Shaped
from llmrouter.wire.completions import Logprobs
from tests.unit.test_stops import reference

ALPHABET = "ab<>/think \n"


def _run(shaper: ChoiceShaper, chunks: list[str], logprobs: bool = False) -> Shaped:
    out = Shaped()
    offsets: list[int] = []
    tokens: list[str] = []
    for chunk in chunks:
        lp = Logprobs([chunk], [-1.0], [{chunk: -1.0}], [0]) if logprobs else None
        _add(out, shaper.feed(chunk, lp), tokens, offsets)
    _add(out, shaper.finish(), tokens, offsets)
    if logprobs:
        out.logprobs = Logprobs(tokens, [-1.0] * len(tokens), None, offsets)
    return out


def _add(out: Shaped, part: Shaped, tokens: list[str], offsets: list[int]) -> None:
    out.text += part.text
    out.reasoning += part.reasoning
    if part.logprobs is not None:
        tokens.extend(part.logprobs.tokens)
        offsets.extend(part.logprobs.text_offset)


def _chunked(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def text_and_chunks(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(st.text(alphabet=ALPHABET, max_size=40))
    return text, _chunked(draw, text)


@settings(max_examples=1000, deadline=None)
@given(text_and_chunks(), st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=4))
def test_stops_never_appear_and_cut_where_the_first_one_completes(
    tc: tuple[str, list[str]], stops: list[str]
) -> None:
    text, chunks = tc
    out = _run(ChoiceShaper(stops=stops), chunks)
    assert not any(stop in out.text for stop in stops)
    assert out.text == reference(text, stops)[0]


@settings(max_examples=1000, deadline=None)
@given(text_and_chunks())
def test_reasoning_is_split_off_the_same_way_whatever_the_chunks(tc: tuple[str, list[str]]) -> None:
    text, chunks = tc
    out = _run(ChoiceShaper(reasoning_tags=("<think>", "</think>")), chunks)
    whole = _run(ChoiceShaper(reasoning_tags=("<think>", "</think>")), [text] if text else [])
    assert (out.text, out.reasoning) == (whole.text, whole.reasoning)
    stripped = text.lstrip()
    if stripped.startswith("<think>") and "</think>" in stripped:
        inner, rest = stripped[len("<think>") :].split("</think>", 1)
        assert out.reasoning == inner
        assert out.text == rest.lstrip()
    elif not stripped.startswith("<think>"):
        assert out.text == text and out.reasoning == ""


@settings(max_examples=200, deadline=None)
@given(text_and_chunks(), st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=3), max_size=2))
def test_text_offsets_point_at_each_token_in_the_choice_text(
    tc: tuple[str, list[str]], stops: list[str]
) -> None:
    _, chunks = tc
    shaper = ChoiceShaper(echo="Q: ", stops=stops, logprobs=1)
    out = _run(shaper, chunks, logprobs=1)
    assert out.logprobs is not None
    assert len(out.logprobs.tokens) == len(out.logprobs.text_offset)
    assert out.text.startswith("Q: ")
    for token, offset in zip(out.logprobs.tokens, out.logprobs.text_offset, strict=True):
        # a token cut by a stop keeps its entry; its surviving text starts at its offset
        assert token.startswith(out.text[offset : offset + len(token)])
    assert out.logprobs.text_offset == sorted(out.logprobs.text_offset)


def test_whitespace_after_the_closing_tag_goes_whatever_the_chunks() -> None:
    for chunks in (
        ["<think>x</think>", "\n", " y"],
        ["<think>x</think>\n y"],
        ["<think>x</think> ", " ", "y"],
    ):
        out = _run(ChoiceShaper(reasoning_tags=("<think>", "</think>")), chunks)
        assert (out.reasoning, out.text) == ("x", "y")


def test_a_prompt_that_opened_the_tag_starts_in_reasoning() -> None:
    out = _run(
        ChoiceShaper(reasoning_tags=("<think>", "</think>"), in_reasoning=True),
        ["hm", "m</thi", "nk> 42"],
    )
    assert (out.reasoning, out.text) == ("hmm", "42")


def test_unclosed_reasoning_is_all_reasoning() -> None:
    out = _run(ChoiceShaper(reasoning_tags=("<think>", "</think>")), ["<think>still ", "going"])
    assert (out.reasoning, out.text) == ("still going", "")


def test_the_deployments_own_echo_is_not_scanned_for_stops() -> None:
    shaper = ChoiceShaper(stops=["STOP"], native_echo=len("say STOP now"))
    out = _run(shaper, ["say STOP", " now", " and STOP here"])
    assert out.text == "say STOP now and "
    assert shaper.stopped


def test_an_unknown_echo_length_shapes_nothing() -> None:
    out = _run(ChoiceShaper(stops=["b"], native_echo=None), ["abc"])
    assert out.text == "abc"


def test_an_end_of_text_entry_that_spells_no_text_keeps_its_token() -> None:
    """An end-of-text token is listed (usage counts it) but not in the text: its entry passes the
    stop scanner, echo and reasoning whole, at the text's end, never mistaken for a cut token."""
    shaper = ChoiceShaper(echo="Q: ", stops=["zz"], logprobs=1)
    first = shaper.feed(
        "Hi z", Logprobs(["Hi", " z"], [-0.5, -0.25], [{"Hi": -0.5}, {" z": -0.25}], [0, 2])
    )
    end = shaper.feed("", Logprobs(["<|im_end|>"], [-0.1], [{"<|im_end|>": -0.1}], [4]))
    tail = shaper.finish()
    assert first.text + end.text + tail.text == "Q: Hi z"
    tokens = [*first.logprobs.tokens, *end.logprobs.tokens, *tail.logprobs.tokens]  # type: ignore[union-attr]
    offsets = [*first.logprobs.text_offset, *end.logprobs.text_offset, *tail.logprobs.text_offset]  # type: ignore[union-attr]
    assert tokens == ["Hi", " z", "<|im_end|>"]
    assert offsets == [3, 5, 7]


def test_a_token_cut_by_a_stop_is_listed_as_the_part_kept() -> None:
    shaper = ChoiceShaper(stops=["lo w"], logprobs=0)
    out = shaper.feed("hello world", Logprobs(["hello", " world"], [-1.0, -2.0], [{}, {}], [0, 5]))
    assert out.text == "hel" and out.logprobs is not None
    assert out.logprobs.tokens == ["hel"]
