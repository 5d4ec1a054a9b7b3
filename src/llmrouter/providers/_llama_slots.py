"""Where an engine's sequences live in llama.cpp: pools (one llama.cpp context each) of slots (one
sequence id each, with a KV-cache stream of its own), and the llama_decode calls of one step.

A sequence's logits must not depend on what else is decoded with it (the same seed gives the same
text alone or beside seven others). On the CPU they do, in a cache the sequences share
(`kv_unified`): a sequence's keys and values land in whatever cells are free, and the attention's
sums group them by cell, so the same sequence at cells 1.. instead of 0.. comes out different
(by as much as 0.7 in a logit on SmolLM2). Each sequence therefore has a stream of its own
(`kv_unified = false`), always filled from its first cell; the rows of one llama_decode are then
computed row by row alike whatever else is in the batch (bench/README.md, issue 16). One thing
still depends on the batch: llama.cpp splits a batch into equal numbers of tokens per sequence, so a
prompt decoded beside other sequences would be split differently than alone. A prompt is therefore
decoded on its own, in chunks of `n_batch` tokens counted from its start, alone or not.

Streams are all of one size. The batch pool's share the model's context between them (a slot holds
`n_ctx / max_sequences` tokens, at least 256); a request that needs more runs in the wide pool, one
sequence of the whole context, as every request did before. So the keys and values take twice the
memory of one context, however many sequences run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DecodeFailed", "Entry", "Pool", "Slot"]

Logits = npt.NDArray[np.float32]


class DecodeFailed(Exception):
    """llama_decode refused or failed a batch; the tokens it was given are out of the cache."""


@dataclass(eq=False)
class Slot:
    """One sequence id of a pool, and what its stream holds between two choices."""

    pool: Pool
    seq: int
    busy: bool = False
    # The prompt whose keys/values fill the stream's first `held_length` cells, and its last
    # logits: the next choice of the same prompt starts from them instead of decoding it again.
    held: tuple[int, int] | None = None
    held_length: int = 0
    held_logits: Logits | None = None

    def clear(self) -> None:
        self.held, self.held_length, self.held_logits = None, 0, None
        self.pool.forget(self.seq, 0)

    def keep_prompt(self) -> None:
        """Drop what a choice generated, keeping the prompt (`held`) for the next choice."""
        self.pool.forget(self.seq, self.held_length)


@dataclass(frozen=True, slots=True)
class Entry:
    """Tokens of one slot for a llama_decode call, from `position` on; `rows`: the logits of every
    token (else of the last only)."""

    slot: Slot
    tokens: Sequence[int]
    position: int
    rows: bool = False


@dataclass(eq=False)
class Pool:
    """A llama.cpp context of `len(slots)` streams of `capacity` tokens each."""

    ctx: Any  # llama_context_p
    capacity: int
    n_vocab: int
    n_batch: int
    size: int  # slots
    slots: list[Slot] = field(init=False)
    _batch: Any = field(init=False)
    _memory: Any = field(init=False)

    def __post_init__(self) -> None:
        import llama_cpp

        self.slots = [Slot(self, seq) for seq in range(self.size)]
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, self.size), 0, 1)
        self._memory = llama_cpp.llama_get_memory(self.ctx)

    def close(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def forget(self, seq: int, start: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self._memory, seq, start, -1)

    def decode(self, entries: Sequence[Entry]) -> list[Logits]:
        """One llama_decode of all `entries` (at most `n_batch` tokens in all); each one's logits
        rows (one, or one per token with `rows`). On failure, DecodeFailed, with none of the
        entries' tokens left in the cache."""
        import llama_cpp

        batch = self._batch
        i = 0
        for entry in entries:
            last = len(entry.tokens) - 1
            for k, token in enumerate(entry.tokens):
                batch.token[i] = token
                batch.pos[i] = entry.position + k
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = entry.slot.seq
                batch.logits[i] = entry.rows or k == last
                i += 1
        batch.n_tokens = i
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            for entry in entries:  # llama.cpp takes out the failed ubatch only, not those before it
                self.forget(entry.slot.seq, entry.position)
            raise DecodeFailed(f"llama_decode returned {code}")
        out: list[Logits] = []
        row = 0
        for entry in entries:
            count = len(entry.tokens) if entry.rows else 1
            if not entry.rows:
                row += len(entry.tokens) - 1
            ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
            out.append(np.ctypeslib.as_array(ptr, shape=(count, self.n_vocab)).copy())
            row += count
        return out
