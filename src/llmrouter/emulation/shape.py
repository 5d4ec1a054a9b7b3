"""How one deployment is made to honour one request: what it is asked, and what the router does.

For each parameter the request sets, a deployment honours it natively (it is passed on), or the
router emulates it exactly, or the deployment cannot serve the request (the plan leaves it out, and
with no deployment left the client gets a 400 naming the parameter). The router emulates:

    n          n calls in parallel (seeds derived from `seed`), choices merged in order
    best_of    best_of candidates (natively or fanned out) with logprobs; the n with the highest
               mean token logprob are returned
    echo       the prompt prepended to each choice (not with logprobs: the prompt must be scored)
    stop       enforced on the text, across chunk boundaries (always, even where native)
    stream     a complete answer sent as a stream (also for `include_usage` where the deployment
               counts no usage in streams)
    json_object, json_schema, python
               each answer checked; an invalid one is asked for again (see the executor)

`Shape.complete` and `Shape.stream` run one attempt through the adapter with all of that applied.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from llmrouter.emulation.choices import ChoiceShaper, Shaped
from llmrouter.errors import InvalidOutput, LlmrouterError, UpstreamUnavailable
from llmrouter.generation import Generation
from llmrouter.providers._chat_template import read_calls
from llmrouter.providers.base import (
    ALL_PARAMETERS,
    CHAT_PARAMETERS,
    Call,
    Capabilities,
    Completion,
    StreamPart,
    Upstream,
)
from llmrouter.settings import ModelSettings
from llmrouter.structured import Checker, format_kind
from llmrouter.wire.chat import ReasoningRequest
from llmrouter.wire.completions import (
    ChunkChoice,
    CompletionChoice,
    CompletionTokensDetails,
    PromptTokensDetails,
    Usage,
)
from llmrouter.wire.tools import FunctionCall, FunctionDelta, ToolCall, ToolCallDelta
from llmrouter.wire.validate import Prompts

__all__ = ["Shape", "honoured_parameters", "requested_parameters", "shape_for"]

T = TypeVar("T")

# Request fields a deployment may lack, that have a neutral value to leave out.
# (Tools are never lacked this way: a request with them goes only where they are native.)
_LACKABLE = ALL_PARAMETERS - {"max_tokens", "response_format", "stream"} - CHAT_PARAMETERS

# response_format kinds the router can honour on any deployment by checking (and asking again).
EMULATED_FORMATS = frozenset({"json_object", "json_schema", "python"})


@dataclass(frozen=True, slots=True)
class _Sub:
    """Which part of the request one call makes: its prompts from `first_prompt` on, and (when
    fanned out) which candidate."""

    first_prompt: int
    candidate: int


_WHOLE = _Sub(0, 0)


class Shape(msgspec.Struct, frozen=True):
    """(A struct: made for every deployment of every request, where a frozen dataclass's
    per-field `object.__setattr__` cost some 7 µs.)"""

    request: Generation  # what each call to the deployment asks (never `stream`), all prompts
    n: int  # choices per prompt for the client
    candidates: int  # choices generated per prompt (best_of when the router chooses)
    fan_out: int  # calls per prompt group; each asks for one choice per prompt when > 1
    split_prompts: bool  # one call per prompt (the deployment takes one prompt at a time)
    choose_best: bool  # the router picks the n best candidates
    logprobs: int | None  # the client's `logprobs` (k)
    echo: bool  # the router prepends the prompt
    native_echo: bool  # the deployment echoes (the prompt's logprobs come from it)
    stops: tuple[str, ...]
    reasoning_tags: tuple[str, str] | None
    checker: Checker | None
    buffered: bool  # the stream is served from a complete (and checked) answer
    emulated: tuple[str, ...] = ()  # the request fields the router honours for the deployment
    drain: bool = False  # read a stream to its end after every choice ended: usage is wanted
    plain: bool = False  # nothing to do but watch for reasoning: answers pass through as they are
    # Tools through a chat template: the router reads the calls out of the answer's text (at
    # most one with `parallel_tool_calls: false`).
    read_calls: bool = False
    one_call: bool = False
    tool_names: frozenset[str] = frozenset()  # the functions it may call

    @property
    def prompts(self) -> Prompts:
        return self.request.prompts

    @property
    def inputs(self) -> int:
        """What the choices are answers to: each prompt, or the one conversation."""
        return len(self.request.prompts) or 1

    # -- one attempt ----------------------------------------------------------------------------

    async def complete(self, provider: Upstream, call: Call) -> Completion:
        calls = self._calls(call)
        if len(calls) == 1:
            results = [await provider.complete(calls[0][0])]
            if self.plain and _untouched(results[0], self.n * self.inputs, self.reasoning_tags):
                return results[0]  # the common case: nothing for the router to do
        else:
            results = await _all([provider.complete(c) for c, _ in calls])
        choices: list[tuple[int, CompletionChoice]] = []
        for (_, sub), result in zip(calls, results, strict=True):
            for choice in result.choices:
                choices.append((self._index(choice.index, sub), choice))
        expected = self.inputs * self.candidates
        if len({i for i, _ in choices}) != expected:
            raise UpstreamUnavailable(
                f"{call.deployment.provider}/{call.deployment.model} returned {len(choices)} "
                f"choices where {expected} were asked for."
            )
        choices.sort(key=lambda ic: ic[0])
        if self.choose_best:
            choices = self._best(choices)
        shaped: list[CompletionChoice] = []
        for i, c in choices:
            choice, unchecked = self._finish_choice(i, c)
            if unchecked is not None:
                await self._check(unchecked)
            shaped.append(choice)
        return Completion(
            choices=shaped,
            usage=_sum_usage([r.usage for r in results]),
            system_fingerprint=results[0].system_fingerprint,
        )

    async def stream(self, provider: Upstream, call: Call) -> AsyncIterator[list[StreamPart]]:
        """The shaped answer, in the batches it came in (see `Upstream.stream`)."""
        if self.buffered:
            result = await self.complete(provider, call)
            text = StreamPart(
                [
                    ChunkChoice(
                        c.text,
                        c.index,
                        c.logprobs,
                        None,
                        msgspec.UNSET,
                        c.reasoning,
                        deltas(c),
                        c.refusal,
                    )
                    for c in result.choices
                ],
                system_fingerprint=result.system_fingerprint,
            )
            ends = [
                ChunkChoice("", c.index, None, c.finish_reason, c.native_finish_reason)
                for c in result.choices
            ]
            yield [text, StreamPart(ends, usage=result.usage)]
            return
        calls = self._calls(call)
        state = _Streaming(self, [sub for _, sub in calls])
        one = len(calls) == 1  # the common case: the call's own batches, no merging layer
        batches: AsyncIterator[Any] = (
            aiter(provider.stream(calls[0][0]))
            if one
            else _merge([provider.stream(c) for c, _ in calls])
        )
        try:
            async for batch in batches:
                j, parts = (0, batch) if one else batch
                out, failure = state.take(j, parts)
                if state.gates:  # a part where a choice ended goes out once its check has passed
                    sent = 0
                    for at, ended in state.gates:
                        if at > sent:
                            yield out[sent:at]
                            sent = at
                        await self._check(ended)
                    state.gates.clear()
                    out = out[sent:]
                if out:
                    yield out
                if failure is not None:
                    raise failure
                if state.done:
                    break
        finally:
            await _close(batches)
        yield [state.end()]

    # -- pieces ---------------------------------------------------------------------------------

    def _calls(self, call: Call) -> list[tuple[Call, _Sub]]:
        """The calls one attempt makes: one, or one per prompt and/or per candidate. (`call`
        already asks `self.request`: the executor builds it so.)"""
        if self.fan_out == 1 and not self.split_prompts:
            return [(call, _WHOLE)]
        groups = [(p, self.prompts[p : p + 1]) for p in range(len(self.prompts))]
        if not self.split_prompts:
            groups = [(0, self.prompts)]
        seed = call.request.seed
        calls: list[tuple[Call, _Sub]] = []
        for first, prompts in groups:
            for j in range(self.fan_out):
                changes: dict[str, object] = {"prompts": prompts}
                if self.fan_out > 1 and seed is not None:
                    changes["seed"] = _derived_seed(seed, j)
                request = msgspec.structs.replace(call.request, **changes)
                calls.append((msgspec.structs.replace(call, request=request), _Sub(first, j)))
        return calls

    def _index(self, index: int, sub: _Sub) -> int:
        """A choice's place among all candidates: prompt p's k-th is p * candidates + k."""
        per_call = 1 if self.fan_out > 1 else self.candidates
        prompts = 1 if self.split_prompts else self.inputs
        if not 0 <= index < prompts * per_call:
            raise UpstreamUnavailable(
                f"The deployment answered with a choice {index} it was not asked for."
            )
        prompt = sub.first_prompt + index // per_call
        k = sub.candidate if self.fan_out > 1 else index % per_call
        return prompt * self.candidates + k

    def _shaper(self, index: int) -> ChoiceShaper:
        prompt = self.prompts[index // self.n] if self.prompts else None  # (a conversation)
        text = prompt if isinstance(prompt, str) else None
        tags = self.reasoning_tags
        return ChoiceShaper(
            echo=text if self.echo else None,
            stops=self.stops,
            reasoning_tags=tags,
            in_reasoning=tags is not None and text is not None and text.rstrip().endswith(tags[0]),
            logprobs=self.logprobs,
            native_echo=(len(text) if text is not None else None) if self.native_echo else 0,
        )

    def _chunk(
        self,
        index: int,
        shaper: ChoiceShaper,
        choice: ChunkChoice,
        ended: set[int],
        unchecked: list[tuple[int, str]],
    ) -> ChunkChoice:
        """A streamed choice's chunk, shaped; a choice that ended adds its index and text to
        `unchecked` when it needs checking (before this chunk goes out)."""
        shaped = shaper.feed(choice.text, choice.logprobs)
        finish, native = choice.finish_reason, choice.native_finish_reason
        if finish is not None and not shaper.stopped:
            _join(shaped, shaper.finish())
        if shaper.stopped:  # by a stop sequence, maybe in what the end released
            finish, native = "stop", "stop"
        if finish is not None:
            ended.add(index)
            if (text := self._to_check(shaper, finish)) is not None:
                unchecked.append((index, text))
        reasoning = "".join(filter(None, (choice.reasoning, shaped.reasoning))) or None
        return ChunkChoice(
            shaped.text,
            index,
            shaped.logprobs,
            finish,
            native,
            reasoning,
            choice.tool_calls,
            choice.refusal,
        )

    def _finish_choice(
        self, index: int, choice: CompletionChoice
    ) -> tuple[CompletionChoice, str | None]:
        """The choice, shaped, and its text if it needs checking."""
        shaper = self._shaper(index)
        shaped = shaper.feed(choice.text, choice.logprobs)
        finish, native = choice.finish_reason, choice.native_finish_reason
        if not shaper.stopped:
            _join(shaped, shaper.finish())
        if shaper.stopped:  # by a stop sequence, maybe in what the end released
            finish, native = "stop", "stop"
        reasoning = "".join(filter(None, (choice.reasoning, shaped.reasoning))) or None
        text, calls = shaped.text, choice.tool_calls
        if self.read_calls and finish == "stop" and not shaper.stopped:  # (a whole answer only)
            text, read = read_calls(text, self.tool_names)
            if read:
                calls = [
                    ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name, arguments))
                    for name, arguments in read[: 1 if self.one_call else None]
                ]
                finish = "tool_calls"
        result = CompletionChoice(
            text=text,
            index=index,
            logprobs=shaped.logprobs if self.logprobs is not None else None,
            finish_reason=finish,
            native_finish_reason=native,
            reasoning=reasoning,
            tool_calls=calls,
            refusal=choice.refusal,
        )
        return result, self._to_check(shaper, finish)

    def _to_check(self, shaper: ChoiceShaper, finish: str) -> str | None:
        """The text of an ended choice that must satisfy the format, if it must."""
        if self.checker is None or finish != "stop" or shaper.stopped:
            return None  # cut by max_tokens or a stop sequence (or a content filter): as it is
        return "".join(shaper.content)

    async def _check(self, text: str) -> None:
        assert self.checker is not None, "_to_check gives a text only when there is a checker"
        problem = await self.checker.check(text)
        if problem is not None:
            raise InvalidOutput(f"The answer does not satisfy response_format: {problem}")

    def _best(self, choices: list[tuple[int, CompletionChoice]]) -> list[tuple[int, CompletionChoice]]:
        """Per prompt, the n candidates with the highest mean token logprob, best first."""
        chosen: list[tuple[int, CompletionChoice]] = []
        for p in range(self.inputs):
            group = [c for i, c in choices if i // self.candidates == p]
            group.sort(key=_mean_logprob, reverse=True)
            chosen.extend((p * self.n + k, c) for k, c in enumerate(group[: self.n]))
        return chosen


class _Streaming:
    """One streamed attempt's choices on their way through: each choice shaped until it is known to
    need nothing more (then passed on as it is), usage summed for the end."""

    def __init__(self, shape: Shape, subs: list[_Sub]) -> None:
        self.shape = shape
        self.subs = subs
        self.expected = shape.inputs * shape.n
        self.shapers: dict[int, ChoiceShaper] = {}
        self.settled: set[int] = set()
        self.ended: set[int] = set()
        self.usages: list[Usage] = []
        self.estimated = False
        self.cut = False  # a choice was ended by the router's stops, before the upstream's end
        self.done = False  # every choice has ended, one by the router: the upstream can be closed
        self.unchecked: list[tuple[int, str]] = []  # choices that ended, to check before sending
        self.gates: list[tuple[int, str]] = []  # (where in `take`'s batch, the text to check there)

    def take(self, j: int, parts: list[StreamPart]) -> tuple[list[StreamPart], LlmrouterError | None]:
        """What of a batch of call `j`'s parts goes to the client, and the failure that cut the
        batch short (after the parts before it). A part in which a choice ended that must pass its
        check waits for it: `gates` says where, with the text. After a part that ends every choice
        (`done`) the rest is not read."""
        out: list[StreamPart] = []
        for part in parts:
            try:
                shaped = self._take(j, part)
            except LlmrouterError as exc:
                return out, exc
            if self.unchecked:  # each choice a part of its own, an ended one after its check
                assert shaped is not None, "an ended choice has its chunk"
                checks = dict(self.unchecked)
                self.unchecked.clear()
                for c in shaped.choices:
                    if c.index in checks:
                        self.gates.append((len(out), checks[c.index]))
                    out.append(StreamPart([c], system_fingerprint=shaped.system_fingerprint))
            elif shaped is not None:
                out.append(shaped)
            if self.done:
                break
        return out, None

    def _take(self, j: int, part: StreamPart) -> StreamPart | None:
        """What of part `part` of call `j` goes to the client (None: nothing yet)."""
        shape = self.shape
        if part.usage is not None:
            self.usages.append(part.usage)
            self.estimated = self.estimated or part.usage_estimated
        if shape.plain and j == 0:
            settled = self.settled
            for c in part.choices:
                if c.index not in settled:
                    break
            else:  # (every choice passes as it is)
                for c in part.choices:
                    if c.finish_reason is not None:
                        self.ended.add(c.index)
                if not part.choices:
                    return None
                if part.usage is None:
                    return part
                return StreamPart(part.choices, system_fingerprint=part.system_fingerprint)
        out: list[ChunkChoice] = []
        for choice in part.choices:
            index = shape._index(choice.index, self.subs[j])
            if index in self.settled:
                out.append(choice)
                if choice.finish_reason is not None:
                    self.ended.add(index)
                continue
            if index in self.ended:
                continue  # after a stop the router enforced: the rest is not sent
            shaper = self.shapers.get(index)
            if (
                shaper is None
                and shape.plain
                and index == choice.index
                and _opens_without_reasoning(choice.text, shape.reasoning_tags)
            ):
                self.settled.add(index)  # (what a shaper would learn from it, at no cost)
                out.append(choice)
                if choice.finish_reason is not None:
                    self.ended.add(index)
                continue
            if shaper is None:
                shaper = self.shapers[index] = shape._shaper(index)
            out.append(shape._chunk(index, shaper, choice, self.ended, self.unchecked))
            if choice.finish_reason is None and index in self.ended:
                self.cut = True  # (by a stop sequence the router enforced)
            if shape.plain and shaper.settled and index not in self.ended:
                self.settled.add(index)
        if len(self.ended) == self.expected and self.cut and not shape.drain and not self.usages:
            # Every choice has ended, one by a stop the router enforced before the upstream knew:
            # stop the upstream rather than let it run on for nothing. (Where the upstream ended
            # each itself, its count follows: read on for it.)
            self.usages.append(Usage(0, sum(s.tokens for s in self.shapers.values()), 0))
            self.estimated = self.done = True
        if not out:
            return None
        return StreamPart(out, system_fingerprint=part.system_fingerprint)

    def end(self) -> StreamPart:
        if len(self.ended) < self.expected:
            missing = min(set(range(self.expected)) - self.ended)
            raise UpstreamUnavailable(f"The stream ended without choice {missing}.")
        usage = _sum_usage(self.usages) if self.usages else None
        return StreamPart([], usage=usage, usage_estimated=self.estimated)


def _opens_without_reasoning(text: str, tags: tuple[str, str] | None) -> bool:
    """Whether a choice's first text shows that it does not open with reasoning: it says
    something that neither is nor could become the opening tag (as `_Reasoning` decides)."""
    if tags is None:
        return True
    said = text.lstrip()
    return bool(said) and not tags[0].startswith(said) and not said.startswith(tags[0])


def _untouched(result: Completion, count: int, tags: tuple[str, str] | None) -> bool:
    """Whether an answer can go out as it came: its choices in order, none opening reasoning."""
    choices = result.choices
    return (
        len(choices) == count
        and all(c.index == i for i, c in enumerate(choices))
        and (tags is None or not any(c.text.lstrip().startswith(tags[0]) for c in choices))
    )


def _mean_logprob(choice: CompletionChoice) -> float:
    values = [v for v in (choice.logprobs.token_logprobs if choice.logprobs else []) if v is not None]
    return sum(values) / len(values) if values else float("-inf")


def _join(into: Shaped, more: Shaped) -> None:
    into.text += more.text
    into.reasoning += more.reasoning
    if more.logprobs is not None:
        if into.logprobs is None:
            into.logprobs = more.logprobs
        else:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(into.logprobs, name).extend(getattr(more.logprobs, name))


def _sum_usage(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return with_details(Usage(prompt, completion, prompt + completion), usages)


def with_details(usage: Usage, parts: list[Usage]) -> Usage:
    """`usage` with the details its parts report, summed (where any reports them)."""
    cached = [u.prompt_tokens_details.cached_tokens for u in parts if u.prompt_tokens_details]
    thought = [
        u.completion_tokens_details.reasoning_tokens for u in parts if u.completion_tokens_details
    ]
    if cached:
        usage.prompt_tokens_details = PromptTokensDetails(sum(cached))
    if thought:
        usage.completion_tokens_details = CompletionTokensDetails(sum(thought))
    return usage


def _derived_seed(seed: int, j: int) -> int:
    """A seed per fanned-out call: the same request gives the same seeds, and different calls
    (or nearby seeds) do not share one. 31 bits, which every upstream accepts."""
    digest = hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 33


async def _all(calls: list[Awaitable[T]]) -> list[T]:
    """Every call's result, in order; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merge(
    streams: list[AsyncIterator[list[StreamPart]]],
) -> AsyncGenerator[tuple[int, list[StreamPart]], None]:
    """The batches of several streams as they come, each with its stream's number."""
    # Bounded, so a slow client slows the upstreams down; one slot more per stream for its end.
    queue: asyncio.Queue[tuple[int, list[StreamPart]] | BaseException | None] = asyncio.Queue(
        maxsize=8 * len(streams)
    )

    async def pump(j: int, stream: AsyncIterator[list[StreamPart]]) -> None:
        end: LlmrouterError | BaseException | None = None
        try:
            async for parts in stream:
                await queue.put((j, parts))
        except BaseException as exc:
            end = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await _close(stream)
            if not isinstance(end, asyncio.CancelledError):
                await queue.put(end)

    tasks = [asyncio.ensure_future(pump(j, s)) for j, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close(stream: object) -> None:
    closer: Callable[[], Awaitable[None]] | None = getattr(stream, "aclose", None)
    if closer is not None:
        await closer()


# -- deciding -----------------------------------------------------------------------------------


def honoured_parameters(caps: Capabilities) -> set[str]:
    """The request fields a deployment honours, natively or emulated (for `/models`)."""
    honoured = set(caps.parameters) | {"n", "stop", "stream", "echo", "response_format"}
    if "logprobs" in caps.parameters or caps.best_of_above_n:
        honoured.add("best_of")
    return honoured


def requested_parameters(request: Generation) -> list[str]:
    """The parameters this request actually asks something of (neutral values ask nothing)."""
    p = request
    wanted: list[str] = []
    if p.prompts and not isinstance(p.prompts[0], str):
        wanted.append("prompt")
    if p.n is not None and p.n > 1:
        wanted.append("n")
    if p.best_of is not None and p.best_of > (p.n or 1):
        wanted.append("best_of")
    if p.echo:
        wanted.append("echo")
    if p.logprobs is not None:
        wanted.append("logprobs")
    for name in ("logit_bias", "stop", "frequency_penalty", "presence_penalty"):
        if getattr(p, name):
            wanted.append(name)
    for name in ("seed", "suffix", "temperature", "top_p"):
        if getattr(p, name) is not None:
            wanted.append(name)
    if p.stream:
        wanted.append("stream")
        if p.include_usage:
            wanted.append("stream_options")
    if format_kind(p.response_format) != "text":
        wanted.append("response_format")
    if p.tools or any(m.tool_calls or m.role == "tool" for m in p.messages):
        wanted.append("tools")  # (a conversation with calls in it needs them understood too)
    if p.tool_choice is not None and p.tool_choice != "auto":
        wanted.append("tool_choice")
    if p.parallel_tool_calls is False:
        wanted.append("parallel_tool_calls")
    if any(m.name and m.role != "tool" for m in p.messages):
        wanted.append("name")
    if p.reasoning is not None and _reasoning_asked(p.reasoning):
        wanted.append("reasoning")  # (`exclude` alone asks nothing of a deployment)
    return wanted


def _reasoning_asked(r: ReasoningRequest) -> bool:
    return r.effort is not None or r.max_tokens is not None or r.enabled is not None


def shape_for(
    caps: Capabilities,
    model: ModelSettings,
    params: Generation,
    wanted: list[str],
    checker: Checker | None,
) -> Shape | tuple[str, str]:
    """The shape that makes this deployment honour the request, or (parameter, why) it cannot.
    `wanted` (`requested_parameters`) and `checker` (`checker_for` the request's format) are the
    request's own, worked out once for all its deployments."""
    native = caps.parameters
    prompts = params.prompts
    n = params.n or 1
    best_of = params.best_of or n
    token_prompts = bool(prompts) and not isinstance(prompts[0], str)
    kind = format_kind(params.response_format)
    asks_logprobs = params.logprobs is not None
    # What the deployment lacks is not sent at all, not even a neutral value (`n: 1`): an
    # upstream may refuse the field itself. Non-neutral values were emulated or refused above.
    changes = _neutral_changes(native).copy()
    fan_out = 1
    choose_best = False
    echo = native_echo = False
    stream_native = True

    if params.messages and not caps.chat and caps.chat_template is None:
        return "messages", "takes a prompt, and has no chat template for a conversation"
    # A completions model whose template writes tools in, and whose calls the router reads out.
    template_calls = not caps.chat and caps.chat_template is not None and caps.chat_template.calls_tools
    if not caps.vision:
        for m in params.messages:
            for part in m.parts:
                if not isinstance(part, str):
                    return part.param, "takes no images (its config does not say `vision`)"
    for name in wanted:
        if name in ("n", "best_of", "echo", "stop", "stream", "response_format"):
            continue  # below, together
        if name == "prompt":
            if not caps.token_prompts:
                return "prompt", "does not accept token-id prompts"
        elif name == "stream_options":
            continue
        elif name == "name" and name not in native:
            i = next(i for i, m in enumerate(params.messages) if m.name and m.role != "tool")
            return f"messages[{i}].name", "has no place for a message's `name`"
        elif name in CHAT_PARAMETERS and name not in ("reasoning", "name") and template_calls:
            if name == "tool_choice" and params.tool_choice != "none":
                return name, "cannot force a call (its model calls tools through its chat template)"
        elif name not in native:
            return name, f"cannot honour `{name}`"
    if params.reasoning is not None and "reasoning" in wanted:
        for knob in ("effort", "max_tokens", "enabled"):
            if getattr(params.reasoning, knob) is not None and knob not in caps.reasoning:
                return f"reasoning.{knob}", f"cannot honour `reasoning.{knob}`"
    for name, (low, high) in caps.ranges.items():
        value = getattr(params, name, None)
        if value is not None and not _within(value, low, high):
            return name, f"takes `{name}` {_range_text(low, high)} only"
    if any(t.strict for t in params.tools) and not caps.strict_tools:
        return "tools", "cannot hold a call to a `strict` function's schema"
    if caps.refuses is not None and (refused := caps.refuses(params)) is not None:
        return refused
    if params.max_tokens == 0 and not caps.max_tokens_zero:
        return "max_tokens", "would take `max_tokens: 0` as no limit at all"
    if asks_logprobs and (params.logprobs or 0) > caps.max_logprobs:
        return "logprobs", f"returns at most {caps.max_logprobs} logprobs per token"

    if params.echo:
        if "echo" in native and (asks_logprobs or token_prompts):
            native_echo = True  # only the deployment can score (or spell) the prompt
        elif asks_logprobs:
            return "echo", "cannot score the prompt, which `echo` with `logprobs` needs"
        elif token_prompts:
            return "echo", "cannot spell out a token-id prompt for `echo`"
        else:
            echo = True
        changes["echo"] = True if native_echo else None
        if token_prompts and params.stop and "stop" not in native:
            return (
                "stop",
                "cannot honour `stop`, and the router cannot apply it to an echoed token-id prompt",
            )
        if token_prompts and kind in EMULATED_FORMATS:
            return "echo", f"cannot be combined with response_format {kind!r} for a token-id prompt"

    if best_of > n:
        if caps.best_of_above_n and "n" in native:
            pass
        elif "logprobs" not in native:
            return (
                "best_of",
                "cannot honour `best_of` greater than `n` (nor give the logprobs to choose by)",
            )
        elif native_echo:
            return "best_of", "cannot honour `best_of` greater than `n` together with echoed logprobs"
        else:
            choose_best = True
            changes["best_of"] = None
            if not asks_logprobs:
                changes["logprobs"] = 0
    candidates = best_of if choose_best else n
    if candidates > 1 and "n" not in native:
        fan_out = candidates
        changes["n"] = None
        changes["best_of"] = None
    elif choose_best:
        changes["n"] = candidates

    # With a format to check, stops are the router's: a choice a stop cut short is returned as it
    # is (as one cut by max_tokens), which the router knows only if it did the cutting.
    router_stops = bool(params.stop) and ("stop" not in native or checker is not None)
    stops = _stops(params)
    if router_stops:
        changes["stop"] = None
    else:  # the stops it takes natively (the first, of those it can), all by the router
        native_stops = [s for s in stops if caps.stop_ok is None or caps.stop_ok(s)]
        native_stops = native_stops[: caps.max_stops]
        if len(native_stops) < len(stops):
            changes["stop"] = native_stops or None
            router_stops = True
    if params.stream and "stream" not in native:
        stream_native = False
    format_native = kind == "text" or kind in caps.response_formats
    if format_native and kind == "json_schema" and caps.schema_support is not None:
        config = params.response_format.json_schema  # type: ignore[union-attr]
        format_native = caps.schema_support(config.schema or {}, bool(config.strict)) is None
    if not format_native:
        if kind not in EMULATED_FORMATS:
            return "response_format", f"cannot honour response_format {kind!r}"
        changes["response_format"] = None
    # Served from a complete answer: a stream the deployment cannot make, an answer to check
    # before any of it is sent, usage the deployment does not count in streams (exact, where
    # the stream's own count would be a guess), or calls to read out of the whole text.
    usage = params.include_usage
    reads_calls = template_calls and bool(params.tools) and params.tool_choice != "none"
    if reads_calls and kind != "text":  # (a grammar or check of the text leaves no room for calls)
        return "response_format", "cannot be combined with tools read from its answer's text"
    if reads_calls and asks_logprobs:
        return "logprobs", "cannot be combined with tools read from its answer's text"
    buffered = params.stream and (
        not stream_native or not format_native or (bool(usage) and not caps.stream_usage) or reads_calls
    )

    split_prompts = len(prompts) > 1 and not caps.prompt_batch
    emulated = [
        name
        for name, done_here in (
            ("prompt", split_prompts or (caps.chat and bool(prompts))),
            ("n", fan_out > 1 and n > 1),
            ("best_of", choose_best),
            ("echo", echo),
            ("stop", router_stops),
            ("stream", params.stream and not stream_native),
            ("stream_options", bool(usage) and buffered and not caps.stream_usage),
            ("response_format", not format_native),
            ("tools", reads_calls),
        )
        if done_here
    ]
    tags = model.reasoning_tags
    plain = (
        not params.stop
        and not params.echo
        and params.logprobs is None
        and checker is None
        and not reads_calls
        and fan_out == 1
        and not choose_best
        and not split_prompts
        and not (tags and any(isinstance(p, str) and p.rstrip().endswith(tags[0]) for p in prompts))
    )
    changed = {name: value for name, value in changes.items() if getattr(params, name) != value}
    return Shape(
        request=msgspec.structs.replace(params, **changed) if changed else params,
        n=n,
        candidates=candidates,
        fan_out=fan_out,
        split_prompts=split_prompts,
        choose_best=choose_best,
        logprobs=params.logprobs,
        echo=echo,
        native_echo=native_echo,
        stops=stops,
        reasoning_tags=model.reasoning_tags,
        checker=checker,
        buffered=buffered,
        emulated=tuple(emulated),
        drain=bool(usage),
        plain=plain,
        read_calls=reads_calls,
        one_call=reads_calls and params.parallel_tool_calls is False,
        tool_names=frozenset(t.name for t in params.tools) if reads_calls else frozenset(),
    )


@functools.lru_cache(maxsize=256)
def _neutral_changes(native: frozenset[str]) -> dict[str, object]:
    """What every call to a deployment that honours `native` leaves out (fields it lacks) or
    turns off (the router streams, and counts, itself): one per deployment kind, not a request."""
    changes: dict[str, object] = dict.fromkeys(_LACKABLE - native)
    changes.update(stream=False, include_usage=False)
    return changes


def deltas(choice: CompletionChoice) -> list[ToolCallDelta] | msgspec.UnsetType:
    """A whole answer's tool calls as one stream delta each (for a stream made of an answer)."""
    if not choice.tool_calls:
        return msgspec.UNSET
    return [
        ToolCallDelta(k, call.id, "function", FunctionDelta(call.function.name, call.function.arguments))
        for k, call in enumerate(choice.tool_calls)
    ]


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _range_text(low: float | None, high: float | None) -> str:
    if low is None:
        return f"at most {high:g}"
    if high is None:
        return f"at least {low:g}"
    return f"from {low:g} to {high:g}"


def _stops(params: Generation) -> tuple[str, ...]:
    if isinstance(params.stop, str):
        return (params.stop,)
    return tuple(params.stop or ())
