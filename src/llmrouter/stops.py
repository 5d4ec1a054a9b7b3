"""Stop sequences enforced on a stream of tokens, across token and chunk boundaries.

Text is held back only while it could still be the beginning of a stop sequence; everything else is
released at once. The output never contains a stop sequence: it ends where the first stop to be
completed (reading left to right) begins, wherever the token or chunk boundaries fall. Pieces carry
a payload (a token's logprob, say) released with their text, so text and per-token data stay aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Piece", "StopScanner"]

P = TypeVar("P")


@dataclass(slots=True)
class Piece(Generic[P]):
    text: str
    payload: P


class StopScanner(Generic[P]):
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending: list[Piece[P]] = []
        self.stopped = False

    def feed(self, piece: Piece[P]) -> list[Piece[P]]:
        """Add one piece; return the pieces now safe to emit. After a stop, `stopped` is set and
        the last returned piece is cut just before the stop sequence."""
        if not self._stops:
            return [piece]
        self._pending.append(piece)
        text = "".join(p.text for p in self._pending)
        cut = self._first_completed(text)
        if cut >= 0:
            self.stopped = True
            return self._release_until(cut, truncate=True)
        return self._release_until(len(text) - self._held_length(text), truncate=False)

    def flush(self) -> list[Piece[P]]:
        """The end of the stream: whatever is held cannot become a stop any more."""
        released, self._pending = self._pending, []
        return released

    def _first_completed(self, text: str) -> int:
        """Where the stop that completes first (in reading order) begins; -1 if none does. Of two
        completing at the same character, the longer wins."""
        best_end, best_start = -1, -1
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                end = start + len(stop)
                if best_end < 0 or end < best_end or (end == best_end and start < best_start):
                    best_end, best_start = end, start
        return best_start

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release_until(self, limit: int, *, truncate: bool) -> list[Piece[P]]:
        released: list[Piece[P]] = []
        end = 0
        for piece in self._pending:
            start, end = end, end + len(piece.text)
            if end <= limit:
                released.append(piece)
            elif truncate and start < limit:
                released.append(Piece(piece.text[: limit - start], piece.payload))
                break
            else:
                break
        self._pending = [] if truncate else self._pending[len(released) :]
        return released
