"""What llmrouter asks a deployment, and what it does itself, for each combination it can meet."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from llmrouter.emulation.shape import Shape, requested_parameters, shape_for
from llmrouter.generation import from_completions
from llmrouter.providers.base import ALL_PARAMETERS, Capabilities
from llmrouter.settings import DeploymentSettings, ModelSettings
from llmrouter.structured import checker_for
from llmrouter.wire.validate import decode_completion_request

MODEL = ModelSettings(id="m", deployments=[DeploymentSettings(provider="p", model="m")])
FULL = Capabilities(
    parameters=ALL_PARAMETERS, response_formats=frozenset({"text", "json_object"}), best_of_above_n=True
)


def lacking(*names: str, **more: Any) -> Capabilities:
    return Capabilities(parameters=ALL_PARAMETERS - set(names), **more)


def shape(caps: Capabilities, **body: Any) -> Shape | tuple[str, str]:
    _, request = from_completions(
        *decode_completion_request(msgspec.json.encode({"prompt": "Hi", **body}))
    )
    wanted = requested_parameters(request)
    return shape_for(caps, MODEL, request, wanted, checker_for(request.response_format))


def ok(caps: Capabilities, **body: Any) -> Shape:
    result = shape(caps, **body)
    assert isinstance(result, Shape), result
    return result


def test_everything_native_is_passed_on_untouched() -> None:
    s = ok(FULL, n=2, best_of=3, stop=["x"], echo=True, logprobs=1)
    assert s.emulated == ()
    assert (s.request.n, s.request.best_of, s.request.stop, s.request.echo) == (2, 3, ["x"], True)
    assert ok(FULL, stream=True).request.stream is False  # the adapter decides how it calls
    assert (s.fan_out, s.candidates, s.buffered) == (1, 2, False)


def test_n_is_fanned_out_with_nothing_sent_about_it() -> None:
    s = ok(lacking("n"), n=3, seed=1)
    assert (s.fan_out, s.candidates, s.emulated) == (3, 3, ("n",))
    assert s.request.n is None


def test_a_neutral_value_of_a_lacking_field_is_not_sent() -> None:
    s = ok(lacking("n", "logit_bias", "presence_penalty"), n=1, logit_bias={}, presence_penalty=0)
    assert (s.request.n, s.request.logit_bias, s.request.presence_penalty) == (None, None, None)
    assert s.emulated == ()


def test_best_of_is_chosen_by_the_router_from_logprobs() -> None:
    s = ok(lacking("best_of"), n=2, best_of=5)
    assert (s.choose_best, s.candidates, s.fan_out) == (True, 5, 1)
    assert (s.request.n, s.request.best_of, s.request.logprobs) == (5, None, 0)
    assert s.logprobs is None  # asked for ranking only: not returned
    fanned = ok(lacking("best_of", "n"), n=2, best_of=5, logprobs=2)
    assert (fanned.fan_out, fanned.request.n, fanned.request.logprobs) == (5, None, 2)
    assert fanned.emulated == ("n", "best_of")
    assert shape(lacking("best_of", "logprobs"), best_of=2) [0] == "best_of"  # fmt: skip
    assert shape(lacking("best_of"), best_of=2, echo=True, logprobs=1)[0] == "best_of"


def test_echo_is_the_routers_unless_the_prompt_must_be_scored() -> None:
    s = ok(FULL, echo=True)
    assert (s.echo, s.native_echo, s.request.echo) == (True, False, None)
    scored = ok(FULL, echo=True, logprobs=1)
    assert (scored.echo, scored.native_echo, scored.request.echo) == (False, True, True)
    assert shape(lacking("echo"), echo=True, logprobs=1) == (
        "echo",
        "cannot score the prompt, which `echo` with `logprobs` needs",
    )
    assert shape(lacking("echo"), echo=True, prompt=[1, 2])[0] == "echo"


def test_stop_and_stream_are_emulated() -> None:
    s = ok(lacking("stop", "stream"), stop="x", stream=True)
    assert s.request.stop is None and s.stops == ("x",)
    assert s.buffered and s.emulated == ("stop", "stream")
    native = ok(FULL, stop="x")
    assert native.request.stop == "x" and native.stops == ("x",)  # and enforced again


def test_stream_usage_comes_from_a_complete_answer_where_streams_count_none() -> None:
    s = ok(lacking(stream_usage=False), stream=True, stream_options={"include_usage": True})
    assert s.buffered and s.emulated == ("stream_options",)
    assert not ok(lacking(stream_usage=False), stream=True).buffered


def test_prompts_are_split_for_a_deployment_that_takes_one() -> None:
    s = ok(lacking(prompt_batch=False), prompt=["a", "b"], n=2)
    assert s.split_prompts and s.fan_out == 1 and s.emulated == ("prompt",)
    assert shape(lacking(token_prompts=False), prompt=[1, 2])[0] == "prompt"


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [("json_object", "native"), ("json_schema", "emulated"), ("python", "emulated"), ("grammar", None)],
)
def test_response_formats(kind: str, outcome: str | None) -> None:
    fmt: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        fmt["json_schema"] = {"name": "x", "schema": {"type": "object"}}
    if kind == "grammar":
        fmt["grammar"] = 'root ::= "a"'
    result = shape(FULL, response_format=fmt)
    if outcome is None:
        assert result == ("response_format", "cannot honour response_format 'grammar'")
        return
    assert isinstance(result, Shape)
    assert result.checker is not None  # checked either way
    assert (result.request.response_format is None) == (outcome == "emulated")
    assert ("response_format" in result.emulated) == (outcome == "emulated")
    streamed = ok(FULL, response_format=fmt, stream=True)
    assert streamed.buffered == (outcome == "emulated")


@pytest.mark.parametrize(
    "name", ["logprobs", "logit_bias", "seed", "suffix", "temperature", "top_p", "frequency_penalty"]
)
def test_what_cannot_be_emulated_is_refused_by_name(name: str) -> None:
    value: Any = {"logit_bias": {"1": 5}, "suffix": "x", "logprobs": 1, "seed": 3}.get(name, 0.5)
    assert shape(lacking(name), **{name: value})[0] == name


def test_logprobs_over_the_deployments_maximum() -> None:
    assert shape(FULL, logprobs=6)[0] == "logprobs"


# -- what a capability can say beyond yes or no ---------------------------------------------------


def test_a_value_outside_a_declared_range_is_not_sent_there() -> None:
    caps = Capabilities(parameters=ALL_PARAMETERS, ranges={"temperature": (0, 1)})
    assert shape(caps, temperature=1.5) == ("temperature", "takes `temperature` from 0 to 1 only")
    assert ok(caps, temperature=1).request.temperature == 1  # the ends are included
    caps = Capabilities(
        parameters=ALL_PARAMETERS, ranges={"top_p": (None, 0.5), "temperature": (1, None)}
    )
    assert shape(caps, top_p=0.9) == ("top_p", "takes `top_p` at most 0.5 only")
    assert shape(caps, temperature=0.5) == ("temperature", "takes `temperature` at least 1 only")
    assert ok(caps).request.temperature is None  # a field the request leaves out asks nothing


def test_stops_beyond_the_native_limit_are_the_routers_and_the_first_are_still_sent() -> None:
    caps = Capabilities(parameters=ALL_PARAMETERS, max_stops=2)
    s = ok(caps, stop=["a", "b", "c"])
    assert s.request.stop == ["a", "b"] and s.stops == ("a", "b", "c") and s.emulated == ("stop",)
    s = ok(caps, stop=["a", "b"])
    assert s.request.stop == ["a", "b"] and s.emulated == ()


def test_a_schema_the_deployment_cannot_constrain_to_is_checked_instead() -> None:
    def support(schema: dict[str, Any], strict: bool) -> str | None:
        return "no `not`" if "not" in schema else None

    caps = Capabilities(
        parameters=ALL_PARAMETERS,
        response_formats=frozenset({"text", "json_schema"}),
        schema_support=support,
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    s = ok(caps, response_format=fmt)
    assert s.emulated == () and s.request.response_format is not None
    fmt["json_schema"]["schema"] = {"not": {"type": "string"}}  # type: ignore[index]
    s = ok(caps, response_format=fmt)
    assert s.emulated == ("response_format",) and s.request.response_format is None
    assert s.checker is not None


def test_a_chat_api_says_the_prompt_became_a_message() -> None:
    caps = Capabilities(parameters=ALL_PARAMETERS, chat=True, prompt_batch=False)
    assert ok(caps).emulated == ("prompt",)
    assert ok(caps, prompt=["a", "b"]).emulated == ("prompt",)


def test_a_conversation_goes_to_a_chat_api_or_a_chat_template_and_is_one_input() -> None:
    from llmrouter.generation import Generation, Message
    from llmrouter.providers._chat_template import ChatTemplate

    request = Generation(messages=(Message("user", "Hi"),), n=2)
    wanted = requested_parameters(request)
    assert shape_for(FULL, MODEL, request, wanted, None) == (
        "messages",
        "takes a prompt, and has no chat template for a conversation",
    )
    chat = Capabilities(parameters=ALL_PARAMETERS, chat=True, prompt_batch=False)
    template = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    templated = dataclasses.replace(FULL, chat_template=template)
    for caps in (chat, templated):
        shaped = shape_for(caps, MODEL, request, wanted, None)
        assert isinstance(shaped, Shape)
        assert shaped.inputs == 1 and shaped.emulated == ()  # nothing became a message: it is one
        assert shaped.request.messages == request.messages  # (the adapter renders the template)


# -- a stream's batches through the shape -----------------------------------------------------------


def shaped_batches(
    s: Shape, *batches: list[Any], usages: list[Any] | None = None
) -> tuple[list[list[Any]], BaseException | None]:
    """What the shape gives of an upstream stream of `batches` (each a list of parts: a
    (text, index, finish) choice, a list of them, or a StreamPart): its batches' choices, and the
    failure that ended it. `usages` gets the usage of each part that has one."""
    import asyncio

    from llmrouter.providers.base import Call, StreamPart
    from llmrouter.settings import Timeouts
    from llmrouter.wire.completions import ChunkChoice

    def part(spec: Any) -> StreamPart:
        if isinstance(spec, StreamPart):
            return spec
        choices = spec if isinstance(spec, list) else [spec]
        return StreamPart([ChunkChoice(t, i, None, f) for t, i, f in choices])

    class Upstream:
        async def stream(self, call: Call) -> Any:
            for batch in batches:
                yield [part(p) for p in batch]

    got: list[list[Any]] = []

    async def run() -> None:
        call = Call(DeploymentSettings(provider="p", model="m"), s.request, Timeouts())
        async for batch in s.stream(Upstream(), call):  # type: ignore[arg-type]
            got.append([(c.text, c.index, c.finish_reason) for p in batch for c in p.choices])
            if usages is not None:
                usages.extend((p.usage, p.usage_estimated) for p in batch if p.usage is not None)

    try:
        asyncio.run(run())
    except Exception as exc:
        return got, exc
    return got, None


def test_a_choice_not_asked_for_fails_the_stream_after_the_parts_before_it() -> None:
    from llmrouter.errors import UpstreamUnavailable

    s = ok(FULL, n=2, stream=True)
    got, failure = shaped_batches(s, [("a", 0, None), ("b", 1, None), ("c", 5, None)])
    assert got == [[("a", 0, None), ("b", 1, None)]]
    assert isinstance(failure, UpstreamUnavailable) and "choice 5" in str(failure)


def test_of_two_checked_choices_ending_in_one_read_the_one_that_passed_goes_out_first() -> None:
    from llmrouter.errors import InvalidOutput

    s = ok(FULL, n=2, stream=True, response_format={"type": "json_object"})
    assert s.checker is not None and not s.buffered
    upstream = [("{}", 0, None), ("no", 1, None)], [("", 0, "stop"), ("pe", 1, None), ("", 1, "stop")]
    got, failure = shaped_batches(s, *upstream)
    assert got == [[("{}", 0, None), ("no", 1, None)], [("", 0, "stop"), ("pe", 1, None)]]
    assert isinstance(failure, InvalidOutput)

    # Ending in one part, as Gemini sends its candidates: the one that passed still goes first.
    upstream = [[("{}", 0, None), ("no", 1, None)]], [[("", 0, "stop"), ("pe", 1, "stop")]]
    got, failure = shaped_batches(s, *upstream)
    assert got == [[("{}", 0, None), ("no", 1, None)], [("", 0, "stop")]]
    assert isinstance(failure, InvalidOutput)


def test_a_stream_the_upstream_ended_itself_is_read_on_for_its_count() -> None:
    """The router's stops make the shape watch every choice; once each has ended, it stops the
    upstream only if one was cut by the router (its count would not come). One the upstream
    ended itself has its count next, which is the ledger's, not an estimate (found by a review)."""
    from llmrouter.providers.base import StreamPart
    from llmrouter.wire.completions import Usage

    s = ok(FULL, stream=True, stop=["zzz"])
    assert not s.plain and not s.drain
    counted = StreamPart([], usage=Usage(120, 3, 123))
    usages: list[Any] = []
    got, failure = shaped_batches(s, [("hello world", 0, None), ("", 0, "stop"), counted], usages=usages)
    assert failure is None and usages == [(Usage(120, 3, 123), False)]
    usages.clear()
    got, failure = shaped_batches(s, [("hello zzz and on", 0, None)], [counted], usages=usages)
    assert failure is None and got[0] == [("hello ", 0, "stop")]  # cut by the router: stopped
    assert usages == [(Usage(0, 1, 1), True)]  # its count, estimated (the upstream's never came)


@pytest.mark.parametrize(
    "chunks",
    [
        ["Hello", " there"],
        ["  Hello", "!"],
        ["<think>why", " not</think>", " Because."],
        ["  <th", "ink>hm</think>ok"],
        ["   ", "\n", "so"],
        ["<", "b>bold</b>"],
        ["", "x"],
        ["<think>", "</think>"],
    ],
)
def test_a_plain_stream_splits_reasoning_off_its_start_as_the_shaper_does(chunks: list[str]) -> None:
    """A choice whose first text cannot open reasoning passes through from its first chunk, with
    no shaper; one that may goes through the shaper until it is known. Either way the text and
    reasoning sent are what the shaper alone makes of the whole."""
    import asyncio

    from llmrouter.emulation.choices import ChoiceShaper
    from llmrouter.providers.base import Call, StreamPart
    from llmrouter.settings import Timeouts
    from llmrouter.wire.completions import ChunkChoice

    s = ok(FULL, stream=True)
    assert s.plain and s.reasoning_tags == ("<think>", "</think>")
    parts = [
        StreamPart([ChunkChoice(t, 0, None, "stop" if i == len(chunks) - 1 else None)])
        for i, t in enumerate(chunks)
    ]

    class Upstream:
        async def stream(self, call: Call) -> Any:
            for p in parts:
                yield [p]

    async def run() -> tuple[str, str]:
        text, reasoning = [], []
        call = Call(DeploymentSettings(provider="p", model="m"), s.request, Timeouts())
        async for batch in s.stream(Upstream(), call):  # type: ignore[arg-type]
            for p in batch:
                for c in p.choices:
                    text.append(c.text)
                    reasoning.append(c.reasoning or "")
        return "".join(text), "".join(reasoning)

    shaper = ChoiceShaper(reasoning_tags=s.reasoning_tags)
    alone = [shaper.feed(t, None) for t in chunks] + [shaper.finish()]
    expected = "".join(x.text for x in alone), "".join(x.reasoning or "" for x in alone)
    assert asyncio.run(run()) == expected
