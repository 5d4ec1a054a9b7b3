"""POST /api/v1/chat/completions (and /v1/chat/completions): the Chat Completions API's side of
the road (`api/pipeline.py`), in OpenAI's format: its decoder and its encoders.

The answer's choices come from the executor as they do for /completions (text, reasoning,
per-token logprobs in the Completions shape); here they become OpenAI's assistant messages and
`chat.completion.chunk` deltas, and the logprobs its `content` list.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from msgspec import UNSET

from llmrouter.api.http import Request
from llmrouter.api.pipeline import Decoded, generate
from llmrouter.api.sse import ChunkStream
from llmrouter.generation import LEAST_THINKING, MOST_THINKING, Generation, from_chat
from llmrouter.providers.base import Completion, StreamPart
from llmrouter.routing.plan import Target
from llmrouter.wire.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Delta,
    Reply,
    TokenLogprob,
    TopLogprob,
)
from llmrouter.wire.completions import ChunkChoice, CompletionChoice, Logprobs, encoder
from llmrouter.wire.validate import decode_chat_request

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["CHAT", "chat_logprobs", "create_chat_completion", "messages_tokens_estimate"]

# A Generation's field -> the chat request's (the others have the same name in both).
_FIELDS = {"max_tokens": "max_completion_tokens", "prompt": "messages"}
# What a chat template may add, in tokens, about: per message (its role's markers) and once (a
# default system prompt, the generation prompt). The credit hold's bound counts these too.
_PER_MESSAGE = 8
_PER_CONVERSATION = 64
# An image, in tokens: about what the APIs charge for a large one (Anthropic's ~1,600 for
# 1,092 x 1,092; OpenAI's high detail ~1,100; Gemini's 258).
_PER_IMAGE = 1600


def _texts(request: Generation) -> list[str]:
    """Every text of the request a model reads: messages, their calls, the declared tools."""
    texts = [m.content for m in request.messages]
    texts += [c.function.name + c.function.arguments for m in request.messages for c in m.tool_calls]
    if request.tools:
        texts.append(encoder.encode(request.tools).decode())
    return texts


def _images(request: Generation) -> int:
    return sum(1 for m in request.messages for part in m.parts if not isinstance(part, str))


def messages_tokens_estimate(request: Generation) -> int:
    """About four characters a token, a few for each message's markers, and each image's."""
    texts = _texts(request)
    return (
        sum(len(t) // 4 + 1 for t in texts)
        + len(request.messages) * (_PER_MESSAGE // 2)
        + _images(request) * _PER_IMAGE
    )


def messages_tokens_bound(request: Generation) -> int:
    """At most a token a UTF-8 byte (byte-level tokenizers), what a template adds, each image."""
    return (
        _PER_CONVERSATION
        + sum(len(t.encode()) for t in _texts(request))
        + len(request.messages) * _PER_MESSAGE
        + _images(request) * _PER_IMAGE
    )


class ChatWire:
    route = "chat.completions"

    def decode(self, body: bytes) -> Decoded:
        route, request = from_chat(decode_chat_request(body))
        r = request.reasoning
        thinking = 0  # what an answer may think besides its own (the most any kind is sent)
        if r is not None and r.enabled is not False:
            if r.max_tokens is not None:
                thinking = max(r.max_tokens, LEAST_THINKING)
            elif r.effort is not None or r.enabled:
                thinking = MOST_THINKING
        return Decoded(
            route,
            request,
            1,
            messages_tokens_estimate(request),
            messages_tokens_bound(request),
            thinking,  # a thinking budget is spent on top of the answer
        )

    def field(self, name: str, request: Generation) -> str:
        if name == "logprobs" and request.logprobs:
            return "top_logprobs"  # (how many is what a deployment could not give)
        return _FIELDS.get(name, name)

    def answer(self, request_id: str, target: Target, result: Completion) -> bytes:
        return encoder.encode(
            ChatCompletion(
                id=request_id,
                created=int(time.time()),
                model=target.model.id,
                provider=target.deployment.provider,
                system_fingerprint=result.system_fingerprint,
                choices=[_choice(c) for c in result.choices],
                usage=result.usage,
            )
        )

    def chunks(self, request_id: str, target: Target, include_usage: bool) -> _Chunks:
        return _Chunks(request_id, target, include_usage)


def _choice(c: CompletionChoice) -> ChatChoice:
    if c.refusal:  # OpenAI's shape: the refusal apart, no content, and a finish that is `stop`
        message = Reply(content=None, refusal=c.text)
        logprobs = chat_logprobs(c.logprobs)
        if logprobs is not None:
            logprobs = ChatLogprobs(content=None, refusal=logprobs.content)
        return ChatChoice(c.index, message, logprobs, "stop", c.native_finish_reason)
    return ChatChoice(
        index=c.index,
        message=Reply(
            # With calls and nothing said, `content` is null, as in OpenAI's answers.
            content=None if c.tool_calls and not c.text else c.text,
            reasoning=UNSET if c.reasoning is None else c.reasoning,
            tool_calls=c.tool_calls,
        ),
        logprobs=chat_logprobs(c.logprobs),
        finish_reason=c.finish_reason,
        native_finish_reason=c.native_finish_reason,
    )


class _Chunks(ChunkStream):
    """The stream's chunks: each choice's first delta carries the assistant's role, its last the
    finish reason (with an empty delta when no text comes with it), as OpenAI's do."""

    __slots__ = ("_refused", "_started")

    def __init__(self, request_id: str, target: Target, include_usage: bool) -> None:
        super().__init__(ChatCompletionChunk, request_id, target, include_usage)
        self._started: set[int] = set()  # choices whose role was sent
        self._refused: set[int] = set()  # choices whose text is a refusal

    def choices(self, part: StreamPart) -> list[ChatChunkChoice]:
        return [self._delta(c) for c in part.choices]

    def _delta(self, c: ChunkChoice) -> ChatChunkChoice:
        delta = Delta()
        if c.refusal:  # (a refusal's text goes apart, and its choice finishes as `stop`)
            self._refused.add(c.index)
        refused = c.index in self._refused
        first = c.index not in self._started
        if first:
            self._started.add(c.index)
            delta.role = "assistant"
        # The first delta says the text even when empty (unless it starts a call), as OpenAI's.
        if c.text or (first and (refused or not c.tool_calls)):
            if refused:
                delta.refusal = c.text
            else:
                delta.content = c.text
        if c.reasoning:
            delta.reasoning = c.reasoning
        if c.tool_calls:
            delta.tool_calls = c.tool_calls
        finish = "stop" if refused and c.finish_reason is not None else c.finish_reason
        return ChatChunkChoice(c.index, delta, chat_logprobs(c.logprobs), finish, c.native_finish_reason)


def chat_logprobs(logprobs: Logprobs | None) -> ChatLogprobs | None:
    """Per-token logprobs in Chat Completions' shape: each token with its UTF-8 bytes and its
    alternatives, most likely first."""
    if logprobs is None:
        return None
    tops = logprobs.top_logprobs or [None] * len(logprobs.tokens)
    content = [
        TokenLogprob(
            token,
            logprob if logprob is not None else 0.0,
            list(token.encode()),
            [
                TopLogprob(alt, alt_logprob, list(alt.encode()))
                for alt, alt_logprob in sorted((top or {}).items(), key=lambda kv: -kv[1])
            ],
        )
        for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, tops, strict=True)
    ]
    return ChatLogprobs(content)


CHAT = ChatWire()


async def create_chat_completion(req: Request, ctx: Context) -> None:
    await generate(req, ctx, CHAT)
