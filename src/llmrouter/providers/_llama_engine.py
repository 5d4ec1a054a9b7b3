"""One GGUF model in this process: a worker thread that owns the llama.cpp context and runs jobs.

The event loop never waits on llama.cpp. Choices are decoded together (continuous batching): each
step samples the next token of every running choice and decodes them all in one llama_decode; a
choice joins between two steps, its prompt read a chunk a step, and leaves when it is done
(`_llama_slots` says where the sequences live, and why a choice's text does not depend on what runs
beside it). A free slot goes to the job running the fewest choices, the earliest of those first, so a
request for many choices does not hold the model from a later one; a job whose client has gone is
dropped at the next step, waiting or running. Sampling is done here
in numpy rather than by llama.cpp's sampler chain so that it means exactly what the Completions API
says: temperature and top_p only (no hidden top_k/min_p), OpenAI's frequency and presence penalties
over the completion's own tokens, logit_bias added to logits, and a per-choice generator seeded from
`seed` so the same request gives the same text.

A grammar (GBNF) restricts that distribution to the tokens llama.cpp's grammar matcher allows, and a
suffix lays the prompt out for fill-in-the-middle with the model's own marker tokens.

Two things an evaluation harness counts on (docs/parameters.md):
- A /completions prompt is text the client wrote whole, so control tokens written in it
  (`<|im_start|>`) are read as those tokens, as llama.cpp's server and vLLM read them, unless the
  deployment says `special_tokens: plain`. `Engine.prepare` is that path; text that is only content
  (a suffix, and a chat message one day) is tokenized by `_tokenize_plain`, which never reads them.
- A choice that ends on the model's end-of-generation token lists that token in its logprobs, spelled
  out, at the end of the text, which leaves it out: one entry per token `usage` counts, as OpenAI's
  legacy models do.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import itertools
import logging
import os
import re
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmrouter.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    LlmrouterError,
    ServiceUnavailable,
)
from llmrouter.providers._chat_template import Segment
from llmrouter.providers._grammar import check_grammar
from llmrouter.providers._llama_slots import DecodeFailed, Entry, Pool, Slot
from llmrouter.stops import Piece, StopScanner
from llmrouter.wire.validate import Prompts

__all__ = ["ChoiceDelta", "ChoiceEnd", "Engine", "Job", "JobUsage", "Prepared", "Sampling"]

log = logging.getLogger("llmrouter.local")

Logits = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int | None  # None: up to the context's end
    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    grammar: str | None = None  # GBNF with a `root` rule, checked by `_grammar.check_grammar`
    guidance: str | None = None  # an llguidance grammar (from a JSON Schema), instead of GBNF
    suffix: str | None = None  # fill-in-the-middle: the text after the completion


# Events a job sends back to the event loop, in order.
@dataclass(frozen=True, slots=True)
class TokenInfo:
    token: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    text: str
    tokens: list[TokenInfo] | None  # only when logprobs were asked for


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    index: int
    finish_reason: str  # "stop" or "length"


@dataclass(frozen=True, slots=True)
class JobUsage:
    prompt_tokens: int
    completion_tokens: int


Event = ChoiceDelta | ChoiceEnd | JobUsage | LlmrouterError | None  # None: the job is over


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prompt ready for the model: its tokens, and its text for echo and text offsets."""

    tokens: list[int]
    text: str
    starter: bool = False  # an empty prompt starts from one document-start token, never echoed
    # The first token was put there by the tokenizer: a document start the text does not hold.
    # (Any other control token is in the text, spelled out: read from it, or, in a token-id
    # prompt, echoed as it would be read back.)
    added_start: bool = False
    # The prompt's own tokens among `tokens` (start, end), when fill-in-the-middle wraps them in the
    # model's markers and the suffix; None: all of them.
    span: tuple[int, int] | None = None


_N_BATCH = 512  # tokens a llama_decode takes at most; a prompt is read in chunks of this many

_serials = itertools.count()
# llama-cpp-python silences a load by pointing file descriptors 1 and 2 at /dev/null and back; two
# loads at once restore each other's /dev/null, and the process loses its stderr (and the log).
_LOADING = threading.Lock()


@dataclass(eq=False)
class Job:
    prompts: list[Prepared]
    n: int
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    serial: int = field(default_factory=lambda: next(_serials))  # never reused, unlike id()
    next_choice: int = 0
    completion_tokens: int = 0
    running: int = 0  # choices being decoded now
    done: int = 0  # choices over

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


class Engine:
    def __init__(
        self,
        name: str,
        path: Path,
        *,
        n_ctx: int | None,
        n_threads: int | None,
        max_queue: int,
        max_sequences: int = 8,
    ) -> None:
        self.name = name
        self.path = path
        self._n_ctx_wanted = n_ctx
        self._n_threads = n_threads or os.cpu_count() or 1
        self._max_queue = max_queue
        self._max_sequences = max_sequences
        self._ready: deque[Job] = deque()  # submitted, not yet seen by the worker
        self._waiting = 0  # submitted jobs none of whose choices has started
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"llama:{name}", daemon=True)
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.n_ctx = 0
        self.n_vocab = 0
        self._llm: Any = None
        self._vocab: Any = None
        self._fim: tuple[int, int, int] | None = None  # the prefix, suffix and middle markers
        # The GGUF's `tokenizer.chat_template`, and the text of its start and end tokens (what a
        # template prints as `bos_token` and `eos_token`): known after `probe`.
        self.chat_template: str | None = None
        self.bos_text = self.eos_text = ""
        self._lltokenizer: Any = None
        # What `_tokenize_prompt` cuts a prompt at (None: llama.cpp does it), and the control
        # tokens, which the text of an answer leaves out.
        self._special: _SpecialTexts | None = None
        self._control_ids: frozenset[int] = frozenset()
        self._pieces: dict[tuple[int, bool], bytes] = {}
        # The worker thread's own: the contexts sequences are decoded in (`_llama_slots`), the jobs
        # it has taken in (in the order they came), and the choices being decoded.
        self._pools: list[Pool] = []
        self._jobs: list[Job] = []
        self._running: list[_Choice] = []

    # -- any thread -----------------------------------------------------------------------------

    @property
    def has_fim(self) -> bool:
        """Whether the model has fill-in-the-middle tokens (so takes a suffix); known once loaded,
        or after `probe`."""
        return self._fim is not None

    def probe(self) -> None:
        """Read what the plan needs to know before the model has loaded (its fill-in-the-middle
        tokens) from its vocabulary alone: a fraction of a second, where loading takes seconds."""
        import llama_cpp

        # llama.cpp's log goes through llama-cpp-python's logger: errors only, as `verbose=False`.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            return  # loading the model proper will say what is wrong
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            self._fim = _fim_markers(vocab)
            self.chat_template = _metadata(model, b"tokenizer.chat_template")
            self.bos_text = _spelled(vocab, llama_cpp.llama_vocab_bos(vocab))
            self.eos_text = _spelled(vocab, llama_cpp.llama_vocab_eos(vocab))
        finally:
            llama_cpp.llama_model_free(model)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def prepare(self, prompts: Prompts, s: Sampling, *, special: bool) -> list[Prepared]:
        """Tokenize and check a /completions request against this model; runs in a helper thread,
        so that a request that cannot fit is refused at once rather than after waiting in the
        queue. `special`: control tokens written in a string prompt are read as those tokens."""
        self._wait_loaded()
        for token in s.logit_bias:
            if token >= self.n_vocab:
                raise InvalidRequest(
                    f"Token id {token} is outside this model's vocabulary (0..{self.n_vocab - 1}).",
                    param=f"logit_bias.{token}",
                )
        if s.grammar is not None:  # checked at the edge too, but `<token>`s only against a model
            check_grammar(s.grammar, is_token=self._is_one_token)
        suffix = None
        if s.suffix is not None:
            if not self.has_fim:
                raise InvalidRequest(
                    f"The local model {self.name} does not support suffix (no fill-in-the-middle "
                    "tokens).",
                    param="suffix",
                )
            suffix = self._tokenize_plain(s.suffix, bos=False)  # as llama.cpp's server reads it
        prepared = [
            self._prepare_one(p, i, len(prompts), suffix, special)  # type: ignore[arg-type]
            for i, p in enumerate(prompts)
        ]
        for i, prompt in enumerate(prepared):
            self._check_context(prompt.tokens, s, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        return prepared

    def tokenize(self, text: str, *, add_special: bool, special: bool) -> list[int]:
        """`text` as `prepare` reads a string prompt (`add_special`: with the document start the
        tokenizer puts first, if it does); in a helper thread."""
        self._wait_loaded()
        return self._tokenize_prompt(text, bos=add_special, special=special)

    def conversation_tokens(
        self,
        segments: Sequence[Segment] | None,
        whole: Callable[[], str],
        contents: Sequence[str],
        others: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, ...]:
        """A rendered chat template's prompt: its own text with control tokens read as tokens,
        the messages' as plain text; the document-start token first where the tokenizer puts one
        and the template did not. Without segments (a template that rewrote its markers) the
        rendering (`whole()`) is read whole, which only a conversation without control-token
        text in its `contents` may be. What else of the request the template writes in (tools,
        calls' arguments and ids: `others`, (field, text) each) is in its text: none may hold a
        control token's text. In a helper thread."""
        self._wait_loaded()
        for param, text in others:
            if self._holds_control_text(text):
                raise InvalidRequest(
                    "This field is written into the model's chat template, whose text is read "
                    "with its control tokens: it may not hold a control token's text.",
                    param=param,
                )
        if segments is None:
            for i, content in enumerate(contents):
                if self._holds_control_text(content):
                    raise InvalidRequest(
                        "This model's chat template rewrites the messages it is given, so "
                        "llmrouter cannot keep a message's text apart from the template's control "
                        "tokens: a message may not hold a control token's text here.",
                        param=f"messages[{i}].content",
                    )
            segments = [Segment(whole(), template=True)]
        tokens: list[int] = []
        for segment in segments:
            if segment.template:
                tokens += self._tokenize_prompt(segment.text, bos=False, special=True)
            else:
                tokens += self._tokenize_plain(segment.text, bos=False)
        bos = int(self._llm.token_bos())
        if self._adds_start and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tuple(tokens)

    def _holds_control_text(self, text: str) -> bool:
        """Whether `text`, read with special tokens parsed, holds one."""
        if self._special is not None:
            return self._special.pattern.search(text.encode("utf-8")) is not None
        read = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return bool(set(read) & self._control_ids)

    def detokenize(self, tokens: list[int], param: str = "tokens") -> str:
        """The text of `tokens`, control tokens spelled out; in a helper thread."""
        self._wait_loaded()
        self._check_ids(tokens, param)
        return self._text(tokens)

    def spelled(self, tokens: list[int]) -> list[str]:
        return [self._spelled(t) for t in tokens]

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's configuration, in the names vLLM's /tokenizer_info uses."""
        self._wait_loaded()
        bos, eos = int(self._llm.token_bos()), int(self._llm.token_eos())
        template = self._llm.metadata.get("tokenizer.chat_template")
        return {
            "tokenizer_class": "llama.cpp",
            "bos_token": self._spelled(bos) if bos >= 0 else None,
            "eos_token": self._spelled(eos) if eos >= 0 else None,
            "add_bos_token": self._adds_start,
            "model_max_length": self.n_ctx,
            "vocab_size": self.n_vocab,
            "chat_template": template,
        }

    def _wait_loaded(self) -> None:
        self.loaded.wait()
        if self.load_error is not None:
            raise ServiceUnavailable(f"The local model {self.name} did not load.")

    def _check_ids(self, tokens: list[int] | tuple[int, ...], param: str) -> None:
        for k, token in enumerate(tokens):
            if token >= self.n_vocab:
                raise InvalidRequest(
                    f"Token id {token} is outside this model's vocabulary (0..{self.n_vocab - 1}).",
                    param=f"{param}[{k}]",
                )

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if self._waiting >= self._max_queue:
                raise ServiceUnavailable(
                    f"The local model {self.name} has {self._max_queue} requests queued; try "
                    "again shortly.",
                    retry_after=1,
                )
            self._waiting += 1
            self._ready.append(job)
            self._wakeup.notify()

    def _prepare_one(
        self,
        prompt: str | tuple[int, ...],
        i: int,
        count: int,
        suffix: list[int] | None,
        special: bool,
    ) -> Prepared:
        added_start = False
        if isinstance(prompt, str) and suffix is not None:
            # Between the fill-in-the-middle markers, as llama.cpp's server reads it: plain text,
            # so that no prompt can write the markers itself.
            tokens = self._tokenize_plain(prompt, bos=False)
            text = prompt
        elif isinstance(prompt, str):
            tokens = self._tokenize_prompt(prompt, bos=True, special=special)
            text = prompt
            added_start = self._adds_start
        else:
            self._check_ids(prompt, "prompt" if count == 1 else f"prompt[{i}]")
            tokens = list(prompt)
            text = self._text(tokens)
        if suffix is not None:
            return self._fill_in_the_middle(tokens, text, suffix)
        if not tokens:  # "as if from the beginning of a new document"
            bos = int(self._llm.token_bos())
            return Prepared([bos if bos >= 0 else int(self._llm.token_eos())], text, starter=True)
        return Prepared(tokens, text, added_start=added_start)

    def _fill_in_the_middle(self, prefix: list[int], text: str, suffix: list[int]) -> Prepared:
        """[BOS] <FIM_PRE> prefix <FIM_SUF> suffix <FIM_MID>, as llama.cpp's server lays out infill
        (without its repository context); the model writes the middle."""
        import llama_cpp

        assert self._fim is not None
        pre, suf, mid = self._fim
        head = [int(self._llm.token_bos())] if llama_cpp.llama_vocab_get_add_bos(self._vocab) else []
        start = len(head) + 1
        tokens = [*head, pre, *prefix, suf, *suffix, mid]
        return Prepared(tokens, text, span=(start, start + len(prefix)))

    @property
    def _adds_start(self) -> bool:
        """Whether this model's tokenizer puts a document-start token before a text."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def _tokenize_prompt(self, text: str, *, bos: bool, special: bool) -> list[int]:
        """A prompt the client wrote whole: control tokens spelled in it are those tokens (when
        `special`), as llama.cpp's server and vLLM read a /completions prompt.

        The text is cut at the special texts here (`_SpecialTexts`), in one pass, and the pieces
        between read as plain text: what llama.cpp's own `parse_special` gives
        (tests/unit/test_grammar.py checks it), which takes time quadratic in the prompt (25 s for
        520 KB of `<|im_start|>x`)."""
        if not special:
            return self._tokenize_plain(text, bos=bos)
        cuts = self._special
        if cuts is None:  # texts that overlap: only llama.cpp's own reading is sure
            return list(self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True))
        import llama_cpp

        data = text.encode("utf-8")
        # What llama.cpp puts around a text when asked for its special tokens (`bos`).
        tokens = [int(self._llm.token_bos())] if bos and self._adds_start else []
        end = bos and llama_cpp.llama_vocab_get_add_eos(self._vocab)
        read: dict[bytes, list[int]] = {}  # chat prompts repeat their pieces (`user\n`)

        def plain(piece: bytes) -> list[int]:
            if piece not in read:
                read[piece] = self._llm.tokenize(piece, add_bos=False, special=False)
            return read[piece]

        start = 0
        for match in cuts.pattern.finditer(data):
            token = cuts.ids[match.group()]
            before = data[start : match.start()]
            if token in cuts.lstrip:  # the token takes the whitespace before it
                before = before.rstrip(_SPACE)
            if before:
                tokens += plain(before)
            tokens.append(token)
            start = match.end()
            if token in cuts.rstrip:  # ... or after it
                while start < len(data) and data[start] in _SPACE:
                    start += 1
        if start < len(data):
            tokens += plain(data[start:])
        return [*tokens, int(self._llm.token_eos())] if end else tokens

    def _tokenize_plain(self, text: str, *, bos: bool) -> list[int]:
        """Text that is content only: `<|im_end|>` in it is ten characters, never a control token.
        Whatever a client puts inside a larger prompt it does not write whole goes through here."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False))

    def _is_one_token(self, text: str) -> bool:
        """Whether a grammar's `<text>` names a token: llama.cpp's test, special tokens included."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) == 1

    def _guidance_tokenizer(self) -> Any:
        """llguidance's view of this model's vocabulary: built once (about a second), on the
        first request that needs it, in the worker thread."""
        if self._lltokenizer is None:
            import llama_cpp
            from llguidance.llamacpp import lltokenizer_from_vocab

            ends = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
            with warnings.catch_warnings():  # it asks each token's kind by a deprecated name
                warnings.simplefilter("ignore", DeprecationWarning)
                self._lltokenizer = lltokenizer_from_vocab(
                    self._vocab, n_vocab=self.n_vocab, eos_token=ends
                )
        return self._lltokenizer

    def _check_context(self, tokens: list[int], s: Sampling, where: str) -> None:
        room = self.n_ctx - len(tokens)
        if room < 0 or (room == 0 and s.max_tokens != 0):
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens, however the prompt "
                f"has {len(tokens)} tokens. Please shorten the prompt.",
                param=where,
            )
        if s.max_tokens is not None and s.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.n_ctx} tokens, however you "
                f"requested {len(tokens) + s.max_tokens} tokens ({len(tokens)} in the prompt, "
                f"{s.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # a broken GGUF must not take the server down; /ready says so
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("local model %s failed to load from %s: %s", self.name, self.path, exc)
        finally:
            self.loaded.set()
        while self._take_jobs():
            if self.load_error is not None:
                for job in list(self._jobs):
                    self._end(job, ServiceUnavailable(f"The local model {self.name} did not load."))
                continue
            for job in [j for j in self._jobs if j.cancelled.is_set()]:
                self._end(job)  # checked every step: a running choice stops at its next token
            self._start_choices()
            self._step()
        for pool in self._pools:
            pool.close()

    def _take_jobs(self) -> bool:
        """Wait until there is work, and take in the jobs submitted since; False once stopping."""
        with self._wakeup:
            while not self._stopping and not self._ready and not self._jobs:
                self._wakeup.wait()
            if self._stopping:
                return False
            self._jobs.extend(self._ready)
            self._ready.clear()
        return True

    def _start_choices(self) -> None:
        """Give the free slots to the choices waiting. Fair turns: the job running the fewest
        choices first, and of those the earliest, so a job of eight choices that fills the slots
        alone yields the next free one to a job that came later. A job's next choice goes to the
        slot that holds its prompt, when that one is free."""
        while True:
            free = [slot for pool in self._pools for slot in pool.slots if not slot.busy]
            waiting = sorted((j for j in self._jobs if j.next_choice < j.choices), key=_running)
            if not free or not waiting:
                return
            # A choice that fits a slot of the batch pool leaves the wide one to a choice that
            # needs it, if one waits.
            smallest = self._pools[0].capacity
            spare = any(self._need(j) > smallest for j in waiting)
            for job in waiting:
                slot = self._slot_for(job, free, spare_wide=spare)
                if slot is not None:
                    self._start_choice(job, slot)
                    break
            else:
                return

    def _need(self, job: Job) -> int:
        """The cells the job's next choice may fill: its prompt and its completion."""
        prompt = job.prompts[job.next_choice // job.n]
        s = job.sampling
        return self.n_ctx if s.max_tokens is None else len(prompt.tokens) + s.max_tokens

    def _slot_for(self, job: Job, free: list[Slot], *, spare_wide: bool) -> Slot | None:
        need = self._need(job)
        fits = [s for s in free if s.pool.capacity >= need]
        if spare_wide and need <= self._pools[0].capacity:
            fits = [s for s in fits if s.pool is self._pools[0]]
        key = (job.serial, job.next_choice // job.n)
        return min(fits, key=lambda s: (s.held != key, s.pool.capacity, s.seq), default=None)

    def _start_choice(self, job: Job, slot: Slot) -> None:
        index = job.next_choice
        if index == 0:
            with self._wakeup:
                self._waiting -= 1
        job.next_choice += 1
        job.running += 1
        slot.busy = True
        try:
            choice = _Choice(self, job, index, slot)
        except Exception as exc:
            slot.busy = False
            job.running -= 1
            self._end(job, self._failure(exc))
            return
        self._running.append(choice)

    def _step(self) -> None:
        """One step: every choice with logits samples its next token; the tokens are decoded
        together, one llama_decode a pool; then the oldest prompt still being read takes one
        chunk (at most `_N_BATCH` tokens), so that a long prompt holds the others up one chunk
        at a time."""
        for choice in [c for c in self._running if c.logits is not None]:
            if choice in self._running and self._guarded(choice, choice.advance):
                self._finish_choice(choice)
        for pool in self._pools:
            ready = [c for c in self._running if c.pending is not None and c.slot.pool is pool]
            if ready:
                self._decode(pool, ready)
        reading = next((c for c in self._running if c.prefill_at is not None), None)
        if reading is not None:
            entry = reading.chunk()
            try:
                rows = reading.slot.pool.decode([entry])
            except DecodeFailed as exc:
                self._end(reading.job, LlmrouterError(f"llama.cpp could not decode: {exc}"))
                return
            self._guarded(reading, lambda: reading.took(len(entry.tokens), rows[0]))

    def _decode(self, pool: Pool, ready: list[_Choice]) -> None:
        """The pending token of each of `ready`, in one llama_decode. If it fails, each one alone
        (a row's logits do not depend on the others), so that only a choice that fails alone
        fails, and its job with it."""
        try:
            rows = pool.decode([c.next_entry() for c in ready])
        except DecodeFailed as exc:
            if len(ready) == 1:
                self._end(ready[0].job, LlmrouterError(f"llama.cpp could not decode: {exc}"))
                return
            for choice in ready:
                if choice in self._running:
                    self._decode(pool, [choice])
            return
        for choice, row in zip(ready, rows, strict=True):
            choice.decoded(row[0])

    def _guarded(self, choice: _Choice, step: Callable[[], bool | None]) -> bool:
        """Run a step of a choice; an error in it ends the choice's job. True: the choice is over."""
        try:
            return bool(step())
        except Exception as exc:
            self._end(choice.job, self._failure(exc))
            return False

    def _failure(self, exc: Exception) -> LlmrouterError:
        if isinstance(exc, LlmrouterError):
            return exc
        log.error("local model %s failed a job", self.name, exc_info=exc)
        return LlmrouterError(f"The local model failed: {type(exc).__name__}")

    def _release(self, choice: _Choice) -> None:
        """The choice leaves its slot; the slot keeps the prompt for the job's next choice."""
        self._running.remove(choice)
        choice.job.running -= 1
        slot = choice.slot
        slot.busy = False
        if slot.held == choice.key:
            slot.keep_prompt()
        else:
            slot.clear()

    def _finish_choice(self, choice: _Choice) -> None:
        self._release(choice)
        job = choice.job
        job.done += 1
        job.completion_tokens += choice.generated
        if job.done == job.choices:
            self._end(job)

    def _end(self, job: Job, error: LlmrouterError | None = None) -> None:
        """The job is over: all its choices done, an error, or its client gone (cancelled)."""
        for choice in [c for c in self._running if c.job is job]:
            if not job.cancelled.is_set():
                job.completion_tokens += choice.generated
            self._release(choice)
        self._jobs.remove(job)
        if job.next_choice == 0:
            with self._wakeup:
                self._waiting -= 1
        if error is not None:
            job.emit(error)
        elif not job.cancelled.is_set():
            prompt_tokens = sum(len(p.tokens) for p in job.prompts)
            job.emit(JobUsage(prompt_tokens, job.completion_tokens))
        job.emit(None)

    def _make_pools(self) -> list[Pool]:
        """The pools, smallest slots first (`_llama_slots`): the batch pool, `max_sequences`
        streams sharing as many tokens as the context holds, and the wide pool, llama-cpp-python's
        own context, one sequence of the whole context."""
        import llama_cpp
        from llama_cpp import _internals

        llm = self._llm
        wide = Pool(llm._ctx.ctx, self.n_ctx, self.n_vocab, _N_BATCH, 1)
        if self._max_sequences == 1:
            return [wide]
        each = max(256, self.n_ctx // self._max_sequences // 256 * 256)  # llama.cpp's granule
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = each * self._max_sequences
        params.n_seq_max = self._max_sequences
        params.kv_unified = False
        params.n_batch = params.n_ubatch = _N_BATCH
        self._batch_context = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        batch = Pool(self._batch_context.ctx, each, self.n_vocab, _N_BATCH, self._max_sequences)
        return [batch, wide]

    def _load(self) -> None:
        import llama_cpp  # imported here: a router without local models never pays

        size_mb = self.path.stat().st_size / 1e6
        log.info("loading local model %s from %s (%.0f MB)", self.name, self.path, size_mb)
        started = time.perf_counter()
        ticker = threading.Thread(target=self._report_loading, args=(started,), daemon=True)
        ticker.start()
        with _LOADING:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=self._n_ctx_wanted or 0,  # 0: the model's training context
                n_batch=_N_BATCH,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                logits_all=False,
                verbose=False,
            )
        self.n_ctx = int(self._llm.n_ctx())
        self.n_vocab = int(self._llm.n_vocab())
        self._pools = self._make_pools()
        self._vocab = self._llm._model.vocab
        self._fim = _fim_markers(self._vocab)
        self._special, self._control_ids = _special_texts(self._vocab, self.n_vocab)
        log.info(
            "local model %s ready in %.2f s (context %d tokens)",
            self.name,
            time.perf_counter() - started,
            self.n_ctx,
        )

    def _report_loading(self, started: float) -> None:
        """llama-cpp-python offers no progress hook, so say every few seconds that it goes on."""
        while not self.loaded.wait(3.0):
            log.info("still loading local model %s (%.0f s)", self.name, time.perf_counter() - started)

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The token's bytes; `special` also spells out control tokens, as llama.cpp's grammar matcher
        reads them. (llama-cpp-python's detokenize loses any piece longer than its 32-byte buffer.)"""
        piece = self._pieces.get((token, special))
        if piece is None:
            import llama_cpp

            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if n < 0:  # the piece needs -n bytes
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = self._pieces[(token, special)] = buf.raw[:n]
        return piece

    def _text(self, tokens: list[int]) -> str:
        """The text of `tokens`, control tokens spelled out: read back as a prompt, it gives the
        same tokens."""
        pieces = (self._piece(t, special=True) for t in tokens)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _spelled(self, token: int) -> str:
        """A token as logprobs name it: control tokens spelled out (`<|im_end|>`, never "")."""
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _emit_pieces(
        self, job: Job, index: int, pieces: list[Piece[TokenInfo | None]], logprobs: bool
    ) -> None:
        if not pieces:
            return
        text = "".join(p.text for p in pieces)
        infos = None
        if logprobs:  # a piece's text may be cut by a stop; one with none is a control token's
            infos = [
                TokenInfo(p.text or p.payload.token, p.payload.logprob, p.payload.top, p.payload.offset)
                for p in pieces
                if p.payload is not None
            ]
        job.emit(ChoiceDelta(index, text, infos))

    def _is_control(self, token: int) -> bool:
        return token in self._control_ids

    def _is_end(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- sampling -----------------------------------------------------------------------------

    def _sample(
        self,
        logits: Logits,
        s: Sampling,
        counts: dict[int, int],
        rng: np.random.Generator,
        grammar: _Grammar | _Guidance | None,
    ) -> int:
        x = logits.astype(np.float64)
        if s.logit_bias:
            ids = np.fromiter(s.logit_bias.keys(), dtype=np.int64)
            x[ids] += np.fromiter(s.logit_bias.values(), dtype=np.float64)
        if counts and (s.frequency_penalty or s.presence_penalty):
            ids = np.fromiter(counts.keys(), dtype=np.int64)
            seen = np.fromiter(counts.values(), dtype=np.float64)
            x[ids] -= seen * s.frequency_penalty + s.presence_penalty
        if grammar is None:
            return self._draw(x, s, rng)
        if s.temperature == 0.0 or s.top_p == 1.0:
            # Checking one token is cheap, the whole vocabulary is not. Keeping an allowed draw and
            # drawing again from the allowed tokens after a refused one is exactly the constrained
            # distribution; with top_p < 1 it is not, as the nucleus must be taken after the grammar.
            token = self._draw(x, s, rng)
            if grammar.allows(token):
                return token
        allowed = grammar.allowed()
        if not allowed.any():
            raise InvalidRequest(
                "The grammar allows no token of this model to come next.", param="response_format"
            )
        x[~allowed] = -np.inf
        return self._draw(x, s, rng)

    def _draw(self, x: npt.NDArray[np.float64], s: Sampling, rng: np.random.Generator) -> int:
        """A token from adjusted logits `x` by temperature and top_p (-inf: never)."""
        if s.temperature == 0.0:
            return int(np.argmax(x))
        with np.errstate(over="ignore", under="ignore"):  # a tiny temperature is near-greedy
            x = (x - x.max()) / s.temperature
            probs = np.exp(x)
        probs /= probs.sum()
        if s.top_p < 1.0:
            return self._nucleus(probs, s.top_p, rng)
        mass = np.cumsum(probs)  # scaled by its end, so rounding never picks a token of no mass
        return int(np.searchsorted(mass, rng.random() * mass[-1], side="right"))

    @staticmethod
    def _nucleus(probs: npt.NDArray[np.float64], top_p: float, rng: np.random.Generator) -> int:
        """Sample from the smallest set of most likely tokens whose mass reaches top_p."""
        k = min(256, len(probs) - 1)
        while True:
            candidates = np.argpartition(-probs, k)[:k] if k < len(probs) else np.arange(len(probs))
            order = candidates[np.argsort(-probs[candidates], kind="stable")]
            mass = np.cumsum(probs[order])
            if mass[-1] >= top_p or k >= len(probs):
                keep = int(np.searchsorted(mass, top_p, side="left")) + 1
                kept = order[:keep]
                weights = mass[: len(kept)]
                pick = int(np.searchsorted(weights, rng.random() * weights[-1], side="right"))
                return int(kept[min(pick, len(kept) - 1)])
            k = min(len(probs), k * 8)

    def _token_info(self, logits: Logits, token: int, text: str, k: int, offset: int) -> TokenInfo:
        logp = _log_softmax(logits)
        return TokenInfo(text, float(logp[token]), self._top(logp, k), offset)

    def _top(self, logp: npt.NDArray[np.float64], k: int) -> dict[str, float]:
        if k <= 0:
            return {}
        best = np.argpartition(-logp, k)[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        return {self._spelled(int(t)): float(logp[t]) for t in best}

    def _prompt_logprobs(self, prompt: Prepared, rows: Logits, k: int) -> list[TokenInfo]:
        if prompt.starter:
            return []
        infos: list[TokenInfo] = []
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        start, end = prompt.span or (0, len(prompt.tokens))
        for i in range(start, end):
            token = prompt.tokens[i]
            spelled = not (i == 0 and prompt.added_start)
            text = decoder.decode(self._piece(token, special=spelled), final=i == end - 1)
            if i == 0:
                infos.append(TokenInfo(text, None, None, offset))
            else:
                logp = _log_softmax(rows[i - 1])
                infos.append(TokenInfo(text, float(logp[token]), self._top(logp, k), offset))
            offset += len(text)
        return infos


class _Choice:
    """One choice in its slot: its prompt read in chunks (or found there, left by the choice
    before), then one token a step: sampled from `logits`, then decoded as `pending`."""

    def __init__(self, engine: Engine, job: Job, index: int, slot: Slot) -> None:
        s = job.sampling
        self.engine, self.job, self.index, self.slot = engine, job, index, slot
        self.prompt = prompt = job.prompts[index // job.n]
        self.key = (job.serial, index // job.n)
        self.want_logprobs = s.logprobs is not None
        self.rng = np.random.default_rng(None if s.seed is None else [s.seed & (2**64 - 1), index])
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = len(prompt.text)  # OpenAI's text_offset counts from the prompt's start
        self.limit = engine.n_ctx - len(prompt.tokens) if s.max_tokens is None else s.max_tokens
        self.grammar: _Grammar | _Guidance | None = None
        if s.guidance is not None:
            self.grammar = _Guidance(engine._guidance_tokenizer(), s.guidance, engine.n_vocab)
        elif s.grammar is not None:
            self.grammar = _Grammar(engine._vocab, s.grammar, engine.n_vocab)
        self.scanner: StopScanner[TokenInfo | None] = StopScanner(s.stop)
        self.counts: dict[int, int] = {}
        self.generated = 0
        self.finish = "length"
        self.end: tuple[Logits, int] | None = None  # the end-of-generation token and its logits
        self.position = len(prompt.tokens)
        self.logits: Logits | None = None  # to sample the next token from
        self.pending: int | None = None  # the token to decode next
        # Echo with logprobs needs every row of the prompt, so reads it afresh; otherwise another
        # choice of the prompt just read in this slot leaves its keys/values and last logits.
        self._rows: list[Logits] | None = [] if s.echo and self.want_logprobs else None
        self.prefill_at: int | None = 0  # the prompt's tokens in the slot, until all are
        if slot.held == self.key and self._rows is None:
            self.prefill_at = None
            self._prompt_read(slot.held_logits)
        else:
            slot.clear()

    def chunk(self) -> Entry:
        """The next tokens of the prompt to decode: chunks of `_N_BATCH` from the prompt's start,
        whatever runs beside, as chunking changes a row's logits (`_llama_slots`)."""
        assert self.prefill_at is not None
        tokens = self.prompt.tokens[self.prefill_at : self.prefill_at + _N_BATCH]
        return Entry(self.slot, tokens, self.prefill_at, rows=self._rows is not None)

    def took(self, count: int, rows: Logits) -> None:
        """`count` tokens of the prompt decoded, with these logits rows."""
        assert self.prefill_at is not None
        self.prefill_at += count
        if self._rows is not None:
            self._rows.append(rows)
        if self.prefill_at < len(self.prompt.tokens):
            return
        self.prefill_at = None
        slot = self.slot
        slot.held, slot.held_length, slot.held_logits = self.key, len(self.prompt.tokens), rows[-1]
        self._prompt_read(rows[-1])

    def _prompt_read(self, logits: Logits | None) -> None:
        assert logits is not None
        job, s = self.job, self.job.sampling
        if self._rows is not None:
            every = np.concatenate(self._rows)
            self._rows = None
            infos = self.engine._prompt_logprobs(self.prompt, every, s.logprobs or 0)
            job.emit(ChoiceDelta(self.index, self.prompt.text, infos))
        elif s.echo:
            job.emit(ChoiceDelta(self.index, self.prompt.text, None))
        self.logits = logits

    def next_entry(self) -> Entry:
        assert self.pending is not None
        return Entry(self.slot, (self.pending,), self.position)

    def decoded(self, logits: Logits) -> None:
        self.logits, self.pending = logits, None
        self.position += 1

    def advance(self) -> bool:
        """Sample the next token, emit its text and set it `pending`; True when the choice is
        over (and its end emitted)."""
        engine, s = self.engine, self.job.sampling
        logits, self.logits = self.logits, None
        assert logits is not None
        if self.generated >= self.limit:
            return self._over()
        grammar = self.grammar
        token = engine._sample(logits, s, self.counts, self.rng, grammar)
        self.generated += 1
        if engine._is_end(token):
            self.finish = "stop"
            self.end = (logits, token)
            return self._over()
        if grammar is not None:
            grammar.accept(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        # Under a grammar the text is what the grammar matched, control tokens spelled out;
        # otherwise the text leaves them out, and logprobs name them.
        hidden = grammar is None and engine._is_control(token)
        if hidden and self._unfinished():
            self.finish = "stop"
            return self._over()
        piece_text = self.decoder.decode(engine._piece(token, special=grammar is not None))
        info = None
        if self.want_logprobs:
            name = engine._spelled(token) if hidden else piece_text
            info = engine._token_info(logits, token, name, s.logprobs or 0, self.offset)
        if self._feed(piece_text, info):
            self.finish = "stop"
            return self._over()
        if self.generated >= self.limit:
            return self._over()
        self.pending = token
        return False

    def _feed(self, text: str, info: TokenInfo | None) -> bool:
        """One piece of text to the stop scanner, and on; True when a stop ended the choice."""
        self.offset += len(text)
        pieces = self.scanner.feed(Piece(text, info))
        self.engine._emit_pieces(self.job, self.index, pieces, self.want_logprobs)
        return self.scanner.stopped

    def _unfinished(self) -> bool:
        """A character left incomplete, by a control token the text leaves out or by the end,
        is U+FFFD: text no token spells, fed before what comes next."""
        tail = self.decoder.decode(b"", final=True)
        self.decoder.reset()
        return bool(tail) and self._feed(tail, None)

    def _over(self) -> bool:
        engine, job, s = self.engine, self.job, self.job.sampling
        if not self.scanner.stopped and self._unfinished():
            self.finish = "stop"
        if not self.scanner.stopped:
            engine._emit_pieces(job, self.index, self.scanner.flush(), self.want_logprobs)
            if self.end is not None and self.want_logprobs:  # counted in usage, so listed
                logits, token = self.end
                info = engine._token_info(
                    logits, token, engine._spelled(token), s.logprobs or 0, self.offset
                )
                job.emit(ChoiceDelta(self.index, "", [info]))
        job.emit(ChoiceEnd(self.index, self.finish))
        return True


def _running(job: Job) -> int:
    return job.running


_SPACE = b" \t\n\v\f\r"  # C's isspace, as llama.cpp strips around a token


@dataclass(frozen=True, slots=True)
class _SpecialTexts:
    """The texts llama.cpp reads as one token each when it parses special tokens (control,
    unknown and user-defined tokens), and which of them take the whitespace beside them."""

    ids: dict[bytes, int]
    pattern: re.Pattern[bytes]  # longest first: of two starting at one place, the longer is read
    lstrip: frozenset[int]
    rstrip: frozenset[int]


def _special_texts(vocab: Any, n_vocab: int) -> tuple[_SpecialTexts | None, frozenset[int]]:
    """The special texts of a vocabulary, and its control tokens. None for the texts when two
    could overlap in a prompt (one's end the other's start): llama.cpp reads the longest first
    over the whole text, which one left-to-right pass does not give."""
    import llama_cpp

    kinds = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    kinds |= llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    ids: dict[bytes, int] = {}
    controls: set[int] = set()
    lstrip: set[int] = set()
    rstrip: set[int] = set()
    for token in range(n_vocab):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if not attr & kinds:
            continue
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            controls.add(token)
        text = llama_cpp.llama_vocab_get_text(vocab, token)
        if text:
            ids.setdefault(bytes(text), token)
            if attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP:
                lstrip.add(token)
            if attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP:
                rstrip.add(token)
    if not ids or _could_overlap(ids):
        return None, frozenset(controls)
    ordered = sorted(ids, key=len, reverse=True)
    pattern = re.compile(b"|".join(re.escape(t) for t in ordered))
    return _SpecialTexts(ids, pattern, frozenset(lstrip), frozenset(rstrip)), frozenset(controls)


def _could_overlap(texts: dict[bytes, int]) -> bool:
    """Whether some text's proper end is another's proper start (`ab`, `bers`: `abers`). A text
    overlapping itself (`aa`) is read alike both ways."""
    starts: dict[bytes, set[bytes]] = {}
    for t in texts:
        for k in range(1, len(t)):
            starts.setdefault(t[:k], set()).add(t)
    return any(starts.get(t[k:], set()) - {t} for t in texts for k in range(1, len(t)))


def _metadata(model: Any, key: bytes) -> str | None:
    """A GGUF metadata value, as text (None: the file has no such key)."""
    import llama_cpp

    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key, buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1


def _spelled(vocab: Any, token: int) -> str:
    """A control token's text ("" for none)."""
    import llama_cpp

    if token < 0:
        return ""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[: max(n, 0)].decode("utf-8", "replace")


def _fim_markers(vocab: Any) -> tuple[int, int, int] | None:
    """The model's fill-in-the-middle prefix, suffix and middle tokens, if it has all three."""
    import llama_cpp

    markers = (
        llama_cpp.llama_vocab_fim_pre(vocab),
        llama_cpp.llama_vocab_fim_suf(vocab),
        llama_cpp.llama_vocab_fim_mid(vocab),
    )
    if min(markers) < 0:  # LLAMA_TOKEN_NULL is -1
        return None
    return int(markers[0]), int(markers[1]), int(markers[2])


# llama.cpp's llama_token_data, for an array of the whole vocabulary handed to the grammar sampler.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _Grammar:
    """One choice's place in a grammar: llama.cpp's grammar sampler, asked which tokens may come next
    (it sets the logit of a token it refuses to -inf) and told which one came.

    Each choice makes its own, so each starts at the grammar's beginning; a finalizer frees the
    sampler, so no way out of a choice leaks it.
    """

    def __init__(self, vocab: Any, grammar: str, n_vocab: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise LlmrouterError("llama.cpp refused a grammar that passed the check.")
        self._sampler = sampler
        weakref.finalize(self, llama_cpp.llama_sampler_free, sampler)
        self._vocabulary = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._vocabulary["id"] = np.arange(n_vocab)
        self._all = llama_cpp.llama_token_data_array(
            self._vocabulary.ctypes.data_as(llama_cpp.llama_token_data_p), n_vocab, -1, False
        )
        self._token: Any = llama_cpp.llama_token_data(0, 0.0, 0.0)
        self._one = llama_cpp.llama_token_data_array(ctypes.pointer(self._token), 1, -1, False)

    def allows(self, token: int) -> bool:
        self._token.id, self._token.logit = token, 0.0
        self._llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._one))
        return bool(self._token.logit == 0.0)

    def allowed(self) -> npt.NDArray[np.bool_]:
        self._vocabulary["logit"] = 0.0
        self._llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._all))
        allowed: npt.NDArray[np.bool_] = self._vocabulary["logit"] == 0.0
        return allowed

    def accept(self, token: int) -> None:
        self._llama_cpp.llama_sampler_accept(self._sampler, token)


class _Guidance:
    """One choice's place in an llguidance grammar: the same three questions as `_Grammar`, for a
    JSON Schema, which llguidance constrains more of than llama.cpp's converter does
    (bench/schema_coverage.py)."""

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self._matcher.is_error():
            raise InvalidRequest(
                f"The JSON Schema cannot be compiled: {self._matcher.get_error()[:300]}",
                param="response_format.json_schema.schema",
            )
        self._n_vocab = n_vocab

    def allows(self, token: int) -> bool:
        return bool(self._matcher.validate_tokens([token]) == 1)

    def allowed(self) -> npt.NDArray[np.bool_]:
        bits = np.unpackbits(
            np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little"
        )
        allowed: npt.NDArray[np.bool_] = bits[: self._n_vocab].astype(bool)
        return allowed

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)


def _log_softmax(logits: Logits) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    x -= x.max()
    out: npt.NDArray[np.float64] = x - np.log(np.exp(x).sum())
    return out


def bind_loop(loop: asyncio.AbstractEventLoop, sink: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """An `emit` for a job: hands each event to the event loop's queue from the worker thread."""

    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(sink.put_nowait, event)

    return emit
