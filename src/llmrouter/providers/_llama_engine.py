"""One GGUF model in this process: a worker thread that owns the llama.cpp context and runs jobs.

The event loop never waits on llama.cpp. Jobs queue first-come first-served; a job whose client has
gone is skipped when its turn comes, and a running one stops at the next token. Sampling is done here
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

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


class Engine:
    def __init__(
        self, name: str, path: Path, *, n_ctx: int | None, n_threads: int | None, max_queue: int
    ) -> None:
        self.name = name
        self.path = path
        self._n_ctx_wanted = n_ctx
        self._n_threads = n_threads or os.cpu_count() or 1
        self._max_queue = max_queue
        self._ready: deque[Job] = deque()
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
        # The prompt whose keys/values are in the context, and its last logits: the next choice of
        # the same prompt starts from them instead of decoding the prompt again.
        self._prompt_in_context: tuple[int, int] | None = None
        self._prompt_logits: Logits | None = None

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
            if len(self._ready) >= self._max_queue:
                raise ServiceUnavailable(
                    f"The local model {self.name} has {self._max_queue} requests queued; try "
                    "again shortly.",
                    retry_after=1,
                )
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
        while (job := self._next_job()) is not None:
            if job.cancelled.is_set():
                job.emit(None)
                continue
            try:
                finished = self._step(job)
            except LlmrouterError as exc:
                job.emit(exc)
                finished = True
            except Exception as exc:
                log.exception("local model %s failed a job", self.name)
                job.emit(LlmrouterError(f"The local model failed: {type(exc).__name__}"))
                finished = True
            if finished:
                job.emit(None)
            else:  # fair turns: one choice, then the back of the line
                with self._wakeup:
                    self._ready.append(job)

    def _next_job(self) -> Job | None:
        with self._wakeup:
            while not self._ready and not self._stopping:
                self._wakeup.wait()
            return None if self._stopping else self._ready.popleft()

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
                n_batch=512,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                logits_all=False,
                verbose=False,
            )
        self.n_ctx = int(self._llm.n_ctx())
        self.n_vocab = int(self._llm.n_vocab())
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

    def _step(self, job: Job) -> bool:
        """Run the job's next choice; True when it was the last."""
        index = job.next_choice
        job.next_choice += 1
        job.completion_tokens += self._choice(job, index)
        if job.next_choice < job.choices:
            return False
        prompt_tokens = sum(len(p.tokens) for p in job.prompts)
        job.emit(JobUsage(prompt_tokens, job.completion_tokens))
        return True

    # -- one choice ---------------------------------------------------------------------------

    def _choice(self, job: Job, index: int) -> int:
        s = job.sampling
        prompt = job.prompts[index // job.n]
        want_logprobs = s.logprobs is not None
        rng = np.random.default_rng(None if s.seed is None else [s.seed & (2**64 - 1), index])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset = len(prompt.text)  # OpenAI's text_offset counts from the prompt's start

        if s.echo and want_logprobs:
            rows = self._prefill(prompt.tokens, all_logits=True)
            infos = self._prompt_logprobs(prompt, rows, s.logprobs or 0)
            job.emit(ChoiceDelta(index, prompt.text, infos))
            logits = rows[-1]
        else:
            logits = self._prompt_state(job, index // job.n, prompt.tokens)
            if s.echo:
                job.emit(ChoiceDelta(index, prompt.text, None))

        limit = self.n_ctx - len(prompt.tokens) if s.max_tokens is None else s.max_tokens
        grammar: _Grammar | _Guidance | None = None
        if s.guidance is not None:
            grammar = _Guidance(self._guidance_tokenizer(), s.guidance, self.n_vocab)
        elif s.grammar is not None:
            grammar = _Grammar(self._vocab, s.grammar, self.n_vocab)
        scanner: StopScanner[TokenInfo | None] = StopScanner(s.stop)

        def feed(text: str, info: TokenInfo | None) -> bool:
            """One piece of text to the stop scanner, and on; True when a stop ended the choice."""
            nonlocal offset
            offset += len(text)
            self._emit_pieces(job, index, scanner.feed(Piece(text, info)), want_logprobs)
            return scanner.stopped

        def unfinished() -> bool:
            """A character left incomplete, by a control token the text leaves out or by the end,
            is U+FFFD: text no token spells, fed before what comes next."""
            tail = decoder.decode(b"", final=True)
            decoder.reset()
            return bool(tail) and feed(tail, None)

        counts: dict[int, int] = {}
        generated = 0
        finish = "length"
        position = len(prompt.tokens)
        end: tuple[Logits, int] | None = None  # the end-of-generation token and its logits
        while generated < limit:
            if job.cancelled.is_set():
                return generated
            token = self._sample(logits, s, counts, rng, grammar)
            generated += 1
            if self._is_end(token):
                finish = "stop"
                end = (logits, token)
                break
            if grammar is not None:
                grammar.accept(token)
            counts[token] = counts.get(token, 0) + 1
            # Under a grammar the text is what the grammar matched, control tokens spelled out;
            # otherwise the text leaves them out, and logprobs name them.
            hidden = grammar is None and self._is_control(token)
            if hidden and unfinished():
                finish = "stop"
                break
            piece_text = decoder.decode(self._piece(token, special=grammar is not None))
            info = None
            if want_logprobs:
                name = self._spelled(token) if hidden else piece_text
                info = self._token_info(logits, token, name, s.logprobs or 0, offset)
            if feed(piece_text, info):
                finish = "stop"
                break
            if generated < limit:
                logits = self._decode_one(token, position)
                position += 1
        if not scanner.stopped and unfinished():
            finish = "stop"
        if not scanner.stopped:
            self._emit_pieces(job, index, scanner.flush(), want_logprobs)
            if end is not None and want_logprobs:  # counted in usage, so listed; not in the text
                end_logits, token = end
                info = self._token_info(end_logits, token, self._spelled(token), s.logprobs or 0, offset)
                job.emit(ChoiceDelta(index, "", [info]))
        job.emit(ChoiceEnd(index, finish))
        return generated

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

    # -- llama.cpp ----------------------------------------------------------------------------

    def _prompt_state(self, job: Job, prompt_index: int, tokens: list[int]) -> Logits:
        """The context holding exactly `tokens`, and the logits after them. Another choice of the
        prompt just decoded reuses its keys/values and logits; anything else decodes the prompt
        afresh, so results never depend on what ran before."""
        key = (job.serial, prompt_index)
        if self._prompt_in_context == key and self._prompt_logits is not None:
            self._llm._ctx.kv_cache_seq_rm(-1, len(tokens), -1)
            return self._prompt_logits
        logits: Logits = self._prefill(tokens, all_logits=False)[-1]
        self._prompt_in_context, self._prompt_logits = key, logits
        return logits

    def _prefill(self, tokens: list[int], *, all_logits: bool) -> Logits:
        """Decode `tokens` into an empty context; return the logits rows (every row of the prompt
        when `all_logits`, else the last one)."""
        llm = self._llm
        self._prompt_in_context = None
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        rows: list[Logits] = []
        for start in range(0, len(tokens), llm.n_batch):
            batch = tokens[start : start + llm.n_batch]
            llm._batch.set_batch(batch=batch, n_past=start, logits_all=all_logits)
            self._decode()
            if all_logits:
                got = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), self.n_vocab))
                rows.append(got.copy())
        if not all_logits:
            return self._last_logits()[None, :]
        return np.concatenate(rows)

    def _decode_one(self, token: int, position: int) -> Logits:
        self._llm._batch.set_batch(batch=[token], n_past=position, logits_all=False)
        self._decode()
        return self._last_logits()

    def _decode(self) -> None:
        try:
            self._llm._ctx.decode(self._llm._batch)
        except RuntimeError as exc:
            self._prompt_in_context = None
            self._llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            raise LlmrouterError(f"llama.cpp could not decode: {exc}") from None

    def _last_logits(self) -> Logits:
        ptr = self._llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

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
