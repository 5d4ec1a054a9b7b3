"""Stop sequences across token boundaries, checked against a plain reference on random inputs."""

from __future__ import annotations

import random

import pytest

from llmrouter.stops import Piece, StopScanner


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool, list[list[str]]]:
    scanner: StopScanner[int] = StopScanner(stops)
    emitted: list[list[str]] = []
    for i, text in enumerate(pieces):
        out = scanner.feed(Piece(text, i))
        emitted.append([p.text for p in out])
        if scanner.stopped:
            return "".join("".join(e) for e in emitted), True, emitted
    emitted.append([p.text for p in scanner.flush()])
    return "".join("".join(e) for e in emitted), False, emitted


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Read one character at a time; stop as soon as some stop sequence has been completed."""
    for end in range(1, len(text) + 1):
        done = [end - len(s) for s in stops if text[:end].endswith(s)]
        if done:
            return text[: min(done)], True
    return text, False


def test_stop_split_across_pieces() -> None:
    text, stopped, _ = run(["Hello wo", "rld! And", " more"], ["world"])
    assert (text, stopped) == ("Hello ", True)


def test_text_that_cannot_begin_a_stop_is_released_at_once() -> None:
    _, _, emitted = run(["abc", "def"], ["xyz"])
    assert emitted[0] == ["abc"] and emitted[1] == ["def"]


def test_held_text_is_released_when_the_stop_does_not_complete() -> None:
    _, _, emitted = run(["ab", "x", "q"], ["xy"])
    assert emitted == [["ab"], [], ["x", "q"], []]


@pytest.mark.parametrize("seed", range(300))
def test_random_streams_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))
    ]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    got, stopped, _ = run(pieces, stops)
    assert (got, stopped) == reference(text, stops)
    assert not any(s in got for s in stops)
