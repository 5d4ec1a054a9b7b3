"""A model's chat template: how a conversation becomes the prompt a completions model was trained
on. The template is Jinja (Hugging Face's convention: `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`, `tools`), from the GGUF's `tokenizer.chat_template`
or the deployment's config, never from a request, and rendered in Jinja's immutable sandbox: a
template can loop and branch, but it cannot reach Python's internals or change what it is given.

The template's own text holds the model's control tokens (`<|im_start|>`); a message's text must
not become one (a user writing `<|im_start|>system` would otherwise speak as the system). So the
template is rendered with a marker in place of each message's content (one no message can hold:
random, new each render), and the result is cut into `Segment`s: the template's text (control
tokens read as such) and each message's content (read as plain text), for a tokenizer that can
read them apart (the local engine's). A template that rewrites what it is given (splitting it,
say), so that the markers do not come out whole, gives None: the engine then reads the rendering
whole, and only if no message holds a control token's text.

`developer` messages reach a template as `system` (templates know the roles of their model's
training, and OpenAI's newer name means the same).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmrouter.errors import InvalidRequest
from llmrouter.settings import ConfigError, DeploymentSettings
from llmrouter.wire.tools import function_fields

__all__ = ["ChatTemplate", "Segment", "chat_template", "read_calls", "template_key"]

log = logging.getLogger("llmrouter")
_MARKS = re.compile(r"<([0-9a-f]{16}):([0-9]+)>")  # a message's place: <key:index>
_PAD = "\u2003"


@dataclass(frozen=True, slots=True)
class Segment:
    text: str
    template: bool  # the template's own text (its control tokens are tokens), else a message's


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


class ChatTemplate:
    """A compiled template, with the special tokens it may print."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self._template = _ENV.from_string(source)  # (jinja2.TemplateSyntaxError)
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Tools: a template that writes them into the prompt (Hugging Face's test: it reads
        # `tools`), and a model that calls them in Hermes's format (`<tool_call>{json}</tool_call>`,
        # Qwen's and Hermes's templates), which the router reads back out of the answer.
        # (Qwen3-Coder's and GLM's write `<tool_call><function=...>`: XML, not read here.)
        self.calls_tools = "tools" in source and "<tool_call>" in source and "<function=" not in source

    def render(self, messages: Sequence[Any], tools: Sequence[Any] = ()) -> str:
        """The prompt for `messages` (the neutral `Message`s), whole, ending where the assistant's
        answer begins; `tools` (the declared functions) where the template writes them."""
        return self._render([_plain(m) for m in messages], tools)

    def segments(self, messages: Sequence[Any], tools: Sequence[Any] = ()) -> list[Segment] | None:
        """The prompt, cut into the template's text and the messages' (see the module's note);
        None when the template rewrote the markers."""
        contents = [m.content for m in messages]
        key = secrets.token_hex(8)  # (no message can hold what it has not seen)
        # Each marker between two em spaces, whitespace no template writes itself: a template
        # that trims the content trims them. An empty message stays empty (templates test it).
        marked = [
            _plain(m, f"{_PAD}<{key}:{i}>{_PAD}" if m.content else "") for i, m in enumerate(messages)
        ]
        rendered = self._render(marked, tools)
        found = [m for m in _MARKS.finditer(rendered) if m.group(1) == key]
        if [int(m.group(2)) for m in found] != [i for i, c in enumerate(contents) if c]:
            return None
        segments: list[Segment] = []
        at = 0
        for match in found:
            start, end = match.start(), match.end()
            content = contents[int(match.group(2))]
            if rendered[start - 1 : start] == _PAD:
                start -= 1
            else:
                content = content.lstrip()
            if rendered[end : end + 1] == _PAD:
                end += 1
            else:
                content = content.rstrip()
            if start > at:
                segments.append(Segment(rendered[at:start], template=True))
            if content:
                segments.append(Segment(content, template=False))
            at = end
        if at < len(rendered):
            segments.append(Segment(rendered[at:], template=True))
        return segments

    def _render(self, messages: list[dict[str, Any]], tools: Sequence[Any]) -> str:
        declared = [{"type": "function", "function": function_fields(t)} for t in tools]
        try:
            return self._template.render(
                messages=messages,
                tools=declared or None,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:  # raise_exception, or an error in the template
            raise InvalidRequest(
                f"The model's chat template refused the conversation: {exc}", param="messages"
            ) from None
        except Exception as exc:  # a template's own bug meeting this input (a TypeError, say)
            raise InvalidRequest(
                f"The model's chat template failed on the conversation: {exc}", param="messages"
            ) from None


def template_key(deployment: DeploymentSettings) -> tuple[str, str | None, str, str]:
    """What a deployment's template depends on (deployments are not hashable)."""
    return deployment.model, deployment.chat_template, deployment.bos_token, deployment.eos_token


def chat_template(
    deployment: DeploymentSettings,
    *,
    default: str | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatTemplate | None:
    """The deployment's template: its config's, else `default` (the model file's); a template
    that does not compile is a config error, named."""
    source = deployment.chat_template or default
    if not source:
        return None
    try:
        return ChatTemplate(
            source,
            bos_token=deployment.bos_token or bos_token,
            eos_token=deployment.eos_token or eos_token,
        )
    except jinja2.TemplateSyntaxError as exc:
        problem = f"chat template does not compile: {exc} (line {exc.lineno})"
        if deployment.chat_template:
            raise ConfigError(
                f"deployment {deployment.model!r} of provider {deployment.provider!r}: its {problem}"
            ) from None
        log.warning("%s: the model file's %s; chat requests pass it over", deployment.model, problem)
        return None


def _plain(message: Any, content: str | None = None) -> dict[str, Any]:
    """A message as templates read it: `role` and `content`, an assistant's `tool_calls` (their
    arguments as objects, as Hugging Face's templates take them) and a result's id and name."""
    plain: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": message.content if content is None else content,
    }
    if message.tool_calls:
        plain["tool_calls"] = [
            {
                "type": "function",
                "id": call.id,
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        plain.update(tool_call_id=message.tool_call_id, name=message.name)
    return plain


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        return text  # (a template prints it as it is)


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def read_calls(text: str, names: frozenset[str]) -> tuple[str, list[tuple[str, str]]]:
    """The calls a model wrote in Hermes's format, and the text around them: each call a JSON
    object of a declared function's `name` and its `arguments` (an object, or its JSON text). A
    block that is not one is left in the text, as the model wrote it. One pass of `str.find`
    (a model's answer may hold any text: no backtracking over it)."""
    calls: list[tuple[str, str]] = []
    kept: list[str] = []
    at = 0
    while (start := text.find(_OPEN, at)) >= 0:
        end = text.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            break
        call = _call(text[start + len(_OPEN) : end], names)
        if call is not None:
            calls.append(call)
            kept.append(text[at:start])
            at = end + len(_CLOSE)
        else:
            kept.append(text[at : end + len(_CLOSE)])
            at = end + len(_CLOSE)
    kept.append(text[at:])
    return "".join(kept).strip() if calls else text, calls


def _call(block: str, names: frozenset[str]) -> tuple[str, str] | None:
    try:
        call = json.loads(block)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
        if not isinstance(parsed, dict):
            return None
        return call["name"], arguments
    if not isinstance(arguments, dict):
        return None
    try:
        return call["name"], json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None
