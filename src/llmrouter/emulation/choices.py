"""One choice's text on its way to the client, the same for every deployment and for streams.

In order: the echoed prompt (when the router echoes it), reasoning split off into its own field
(`<think>…</think>` at the start of the completion), stop sequences enforced (whether or not the
deployment did), and logprob entries kept aligned with the text that survives, their `text_offset`
counted in characters of the choice's text, echo included. A non-streamed answer is one delta.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmrouter.stops import Piece, StopScanner
from llmrouter.wire.completions import Logprobs

__all__ = ["ChoiceShaper", "Entry", "Shaped"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One token's logprob data, as the deployment gave it, and how much of the text it spelled
    (none for an end-of-text token, which the text leaves out)."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    chars: int


@dataclass(slots=True)
class Shaped:
    """What a delta became: text for the client, reasoning, and the logprobs of that text."""

    text: str = ""
    reasoning: str = ""
    logprobs: Logprobs | None = None


@dataclass(slots=True)
class _Reasoning:
    """Splits reasoning off the start of a completion, across any piece boundaries."""

    tags: tuple[str, str]
    state: str = "start"  # "start" (not yet known), "inside", "after" (the tag), or "content"
    held: list[Piece[Entry | None]] = field(default_factory=list)
    buffer: str = ""  # reasoning text not yet released (could hold the start of the close tag)

    def feed(self, pieces: list[Piece[Entry | None]]) -> tuple[str, list[Piece[Entry | None]]]:
        reasoning: list[str] = []
        content: list[Piece[Entry | None]] = []
        for piece in pieces:
            if not piece.text and piece.payload is not None and self.state in ("inside", "after"):
                content.append(piece)  # an entry that spells nothing (end-of-text) stays listed
            elif self.state == "after":  # whitespace after the closing tag is dropped
                text = piece.text.lstrip()
                if text:
                    self.state = "content"
                    content.append(Piece(text, piece.payload))
            elif self.state == "content":
                content.append(piece)
            elif self.state == "start":
                self.held.append(piece)
                self._decide(reasoning, content)
            else:
                self._inside(piece.text, reasoning, content)
        return "".join(reasoning), content

    def _decide(self, reasoning: list[str], content: list[Piece[Entry | None]]) -> None:
        opening = self.tags[0]
        text = "".join(p.text for p in self.held).lstrip()
        if opening.startswith(text):  # still could be the opening tag (or only whitespace)
            return
        held, self.held = self.held, []
        if not text.startswith(opening):
            self.state = "content"
            content.extend(held)
            return
        self.state = "inside"
        self._inside(text[len(opening) :], reasoning, content)

    def _inside(self, text: str, reasoning: list[str], content: list[Piece[Entry | None]]) -> None:
        closing = self.tags[1]
        self.buffer += text
        end = self.buffer.find(closing)
        if end >= 0:
            reasoning.append(self.buffer[:end])
            rest = self.buffer[end + len(closing) :].lstrip()
            self.buffer = ""
            self.state = "content" if rest else "after"
            if rest:
                content.append(Piece(rest, None))
            return
        keep = _partial_suffix(self.buffer, closing)
        reasoning.append(self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep :]

    def flush(self) -> tuple[str, list[Piece[Entry | None]]]:
        if self.state in ("after", "content"):
            return "", []
        if self.state == "start":
            held, self.held = self.held, []
            self.state = "content"
            return "", held
        reasoning, self.buffer = self.buffer, ""
        return reasoning, []


class ChoiceShaper:
    def __init__(
        self,
        *,
        echo: str | None = None,
        stops: Sequence[str] = (),
        reasoning_tags: tuple[str, str] | None = None,
        in_reasoning: bool = False,  # the prompt opened the reasoning tag itself
        logprobs: int | None = None,
        native_echo: int | None = 0,
    ) -> None:
        """`echo`: text the router echoes first. `native_echo`: how many characters at the start of
        the deployment's text are its own echo of the prompt, passed on untouched (None: unknown,
        as for a token-id prompt: then nothing is shaped, and the deployment enforced the stops)."""
        self._echo = echo
        self._passthrough = native_echo
        self._scanner: StopScanner[Entry | None] = StopScanner(stops)
        self._reasoning = _Reasoning(reasoning_tags) if reasoning_tags is not None else None
        if self._reasoning is not None and in_reasoning:
            self._reasoning.state = "inside"
        self._logprobs = logprobs  # k: top_logprobs entries per token
        self.emitted = 0  # characters of text sent so far: the next text_offset
        self.content: list[str] = []  # the completion's text (no echo, no reasoning): for checks
        self.stopped = False  # a stop sequence ended the choice
        self.tokens = 0  # tokens (or, without logprobs, text deltas) the deployment sent

    @property
    def settled(self) -> bool:
        """Past any reasoning, holding nothing back: with no stops or echo, what follows would pass
        through unchanged."""
        return self._reasoning is None or (
            self._reasoning.state == "content" and not self._reasoning.held
        )

    def feed(self, text: str, logprobs: Logprobs | None) -> Shaped:
        self.tokens += (
            len(logprobs.tokens) if logprobs is not None and logprobs.tokens else int(bool(text))
        )
        if self.stopped:
            return Shaped()
        return self._shape(_pieces(text, logprobs, self._logprobs or 0), final=False)

    def finish(self) -> Shaped:
        """The deployment ended the choice: release what was held back."""
        if self.stopped:
            return Shaped()
        return self._shape([], final=True)

    def _shape(self, pieces: list[Piece[Entry | None]], *, final: bool) -> Shaped:
        out = Shaped()
        echoed: list[Piece[Entry | None]] = []
        if self._echo is not None:
            echoed = [Piece(self._echo, None)]
            self._echo = None
        if self._passthrough is None:
            self.content.extend(p.text for p in pieces)
            self._emit(out, pieces)
            return out
        if self._passthrough:
            echoed, pieces = _split(pieces, self._passthrough)
            self._passthrough -= sum(len(p.text) for p in echoed)
        if self._reasoning is not None:
            out.reasoning, pieces = self._reasoning.feed(pieces)
            if final:
                tail_reasoning, tail = self._reasoning.flush()
                out.reasoning += tail_reasoning
                pieces = pieces + tail
        released: list[Piece[Entry | None]] = []
        for piece in pieces:
            released.extend(self._scanner.feed(piece))
            if self._scanner.stopped:
                self.stopped = True
                break
        if final and not self.stopped:
            released.extend(self._scanner.flush())
        self.content.extend(p.text for p in released)
        self._emit(out, echoed + released)
        return out

    def _emit(self, out: Shaped, pieces: list[Piece[Entry | None]]) -> None:
        out.text = "".join(p.text for p in pieces)
        if self._logprobs is not None:
            lp = Logprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
            offset = self.emitted
            for piece in pieces:
                if piece.payload is not None:
                    token = piece.payload.token
                    if len(piece.text) < piece.payload.chars and token.startswith(piece.text):
                        token = piece.text  # cut by a stop sequence: the part that was kept
                    lp.tokens.append(token)
                    lp.token_logprobs.append(piece.payload.logprob)
                    lp.top_logprobs.append(piece.payload.top)  # type: ignore[union-attr]
                    lp.text_offset.append(offset)
                offset += len(piece.text)
            out.logprobs = lp
        self.emitted += len(out.text)


def _pieces(text: str, logprobs: Logprobs | None, k: int) -> list[Piece[Entry | None]]:
    """The text cut at its tokens, each piece carrying its token's entry. The text is the truth:
    tokens that do not spell it (a partial UTF-8 character, say) are aligned as far as they go,
    except a token the text leaves out (an end-of-text or other control token), which the text
    does not hold where it stands and the deployment's own offsets give no width: it spells
    nothing, at the place those offsets say."""
    if logprobs is None or not logprobs.tokens:
        return [Piece(text, None)] if text else []
    pieces: list[Piece[Entry | None]] = []
    position = 0
    tokens = logprobs.tokens
    tops = logprobs.top_logprobs or [None] * len(tokens)
    starts = _relative_offsets(logprobs, len(text))
    for i, (token, logprob, top) in enumerate(zip(tokens, logprobs.token_logprobs, tops, strict=False)):
        if starts is not None and starts[i] == starts[i + 1] and not text.startswith(token, position):
            if starts[i] > position:  # text before it that no token spelled
                pieces.append(Piece(text[position : starts[i]], None))
                position = starts[i]
            pieces.append(Piece("", Entry(token, logprob, _best(top, k), 0)))
            continue
        segment = text[position : position + len(token)]
        position += len(segment)
        pieces.append(Piece(segment, Entry(token, logprob, _best(top, k), len(segment))))
    if position < len(text):
        pieces.append(Piece(text[position:], None))
    return pieces


def _relative_offsets(logprobs: Logprobs, length: int) -> list[int] | None:
    """Where the deployment says each token starts in this delta's text, and the text's end;
    None where its offsets cannot be read so (missing, out of order, or past the text)."""
    offsets = logprobs.text_offset
    if not offsets or len(offsets) != len(logprobs.tokens):
        return None
    starts = [o - offsets[0] for o in offsets] + [length]
    if any(b < a for a, b in itertools.pairwise(starts)):
        return None
    return starts


def _best(top: dict[str, float] | None, k: int) -> dict[str, float] | None:
    """At most k entries (some upstreams add the sampled token to the k best)."""
    if top is None or len(top) <= k:
        return top
    return dict(sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:k])


def _split(
    pieces: list[Piece[Entry | None]], chars: int
) -> tuple[list[Piece[Entry | None]], list[Piece[Entry | None]]]:
    """The first `chars` characters of `pieces`, and the rest (a piece across the line is cut,
    its entry staying with its first part)."""
    head: list[Piece[Entry | None]] = []
    for i, piece in enumerate(pieces):
        if len(piece.text) <= chars:
            head.append(piece)
            chars -= len(piece.text)
            continue
        if chars:
            head.append(Piece(piece.text[:chars], piece.payload))
            return head, [Piece(piece.text[chars:], None), *pieces[i + 1 :]]
        return head, pieces[i:]
    return head, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back: it may complete)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
