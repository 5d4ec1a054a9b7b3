"""A model's chat template: how a conversation becomes the prompt a completions model was trained
on. The template is Jinja (Hugging Face's convention: `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`, `tools`), from the GGUF's `tokenizer.chat_template`
or the deployment's config, never from a request, and rendered in Jinja's immutable sandbox: a
template can loop and branch, but it cannot reach Python's internals or change what it is given.

The template's own text holds the model's control tokens (`<|im_start|>`); a message's text must
not become one (a user writing `<|im_start|>system` would otherwise speak as the system). So the
template is rendered with a marker in place of each message's content, and the result is cut
into `Segment`s: the template's text (control tokens read as such) and each message's content
(read as plain text), for a tokenizer that can read them apart (the local engine's). A template
that rewrites what it is given (splitting it, say), so that the markers do not come out whole, is
rendered with the real content instead, read whole.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmrouter.errors import InvalidRequest
from llmrouter.settings import ConfigError, DeploymentSettings

__all__ = ["ChatTemplate", "Segment", "chat_template", "template_key"]

log = logging.getLogger("llmrouter")

# A marker no message can hold (the edge refuses no character, but this one is generated per
# template render and checked absent from the contents first).
_MARK = "\x00llmrouter:{}\x00"
_MARKS = re.compile("\x00llmrouter:([0-9]+)\x00")


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
        # Hugging Face's test: a template that reads `tools` can write them into the prompt.
        self.takes_tools = "tools" in source

    def render(self, messages: Sequence[Any]) -> str:
        """The prompt for `messages` (the neutral `Message`s), whole, ending where the assistant's
        answer begins."""
        return self._render([_plain(m) for m in messages])

    def segments(self, messages: Sequence[Any]) -> list[Segment]:
        """The prompt, cut into the template's text and the messages' (see the module's note)."""
        contents = [m.content for m in messages]
        # Each marker between two spaces: a template that trims the content trims them.
        marked = [_plain(m, f" {_MARK.format(i)} ") for i, m in enumerate(messages)]
        rendered = self._render(marked)
        found = [int(i) for i in _MARKS.findall(rendered)]
        if found != list(range(len(messages))) or any("\x00" in c for c in contents):
            return [Segment(self.render(messages), template=True)]
        segments: list[Segment] = []
        at = 0
        for match in _MARKS.finditer(rendered):
            start, end = match.start(), match.end()
            content = contents[int(match.group(1))]
            if rendered[start - 1 : start] == " ":
                start -= 1
            else:
                content = content.lstrip()
            if rendered[end : end + 1] == " ":
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

    def _render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._template.render(
                messages=messages,
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
    """A message as templates read it: a dict of `role` and `content`."""
    return {"role": message.role, "content": message.content if content is None else content}
