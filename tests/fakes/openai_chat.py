"""A fake OpenAI Chat Completions upstream (`POST /v1/chat/completions`): a real HTTP server on
loopback where the model name (or an `X-Fault` header, which wins) picks the fault.

    python tests/fakes/openai_chat.py PORT

It answers as api.openai.com does: `chat.completion` objects, `chat.completion.chunk` streams of
`data: {...}` events ended by `data: [DONE]` (with `stream_options.include_usage`, every chunk
has `"usage": null` and a last chunk has `"choices": []` and the usage), `obfuscation` padding on
stream chunks, logprobs as `choices[].logprobs.content[]` of {token, logprob, bytes,
top_logprobs}, and errors as {"error": {"message", "type", "param", "code"}}. The prompt is every
message's text, one line each; `max_completion_tokens` (or `max_tokens`), `stop`, `n`, `seed`,
`temperature`, `logprobs` + `top_logprobs` and `response_format` (json_object, json_schema) are
honoured (see tests/fakes/answers.py). It requires `Authorization: Bearer KEY` (401 without).

Faults (streamed and not, unless said), besides those of tests/fakes/faults.py:
  ok                  "Hello from fake", finish_reason stop
  lm, lm-*            the deterministic model of tests/fakes/lm.py (finish_reason length, or stop)
  refuse              400 with code content_policy_violation
  ...-think           the answer follows DeepSeek-style `reasoning_content`
  ...-reasoning       the answer follows a `reasoning` field (vLLM, OpenRouter)
  ...-refusal         200 with `message.refusal` and `content` null (streamed: `delta.refusal`)
  ...-content-filter  one token of the answer, then finish_reason content_filter
  ...-cache           usage.prompt_tokens_details.cached_tokens is 64
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from aiohttp import web

try:
    from tests.fakes import answers, faults, lm
except ImportError:  # run as a script: python tests/fakes/openai_chat.py PORT
    import answers  # type: ignore[no-redef]
    import faults  # type: ignore[no-redef]
    import lm  # type: ignore[no-redef]

FLAGS = ("think", "reasoning", "refusal", "content-filter", "cache")
REFUSAL = "I'm sorry, I can't help with that."
CACHED = 64
_ids = itertools.count(1)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}


def _error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    kind = _TYPES.get(status, "requests" if status == 429 else "server_error")
    error = {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}
    return json.dumps({"error": error}, indent=2).encode()


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, **more: Any
) -> web.Response:
    body = _error_body(status, message, **more)
    headers = {"x-request-id": f"req_fake{next(_ids)}", **(headers or {})}
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


WIRE = faults.Wire(
    error=lambda status, message, headers: _error(status, message, headers),
    context_error=lambda: _error(
        400,
        "This model's maximum context length is 128000 tokens. However, your messages resulted in "
        "130517 tokens. Please reduce the length of the messages.",
        param="messages",
        code="context_length_exceeded",
    ),
    stream_error=faults.sse(
        {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    ),
    malformed_event=b'data: {"id": "chatcmpl-fake", "choices": [\n\n',
    error_body=_error_body(500, "The server had an error while processing your request."),
)


def _prompt(messages: list[dict[str, Any]]) -> str:
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        if content:
            lines.append(str(content))
    return "\n".join(lines)


def _sampling(body: dict[str, Any]) -> answers.Sampling:
    stop = body.get("stop")
    fmt = body.get("response_format") or {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return answers.Sampling(
        max_tokens=limit,
        stops=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        n=body.get("n") or 1,
        seed=body.get("seed"),
        temperature=body.get("temperature"),
        top_logprobs=(body.get("top_logprobs") or 0) if body.get("logprobs") else None,
        json=fmt if fmt.get("type") in ("json_object", "json_schema") else None,
    )


def _logprob(token: str, value: float, tops: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": value,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops],
    }


def _finish(candidate: answers.Candidate, fault: faults.Fault) -> str:
    if "content-filter" in fault.flags:
        return "content_filter"
    return "length" if candidate.finish == "length" else "stop"


def _usage(answer: answers.Answer, fault: faults.Fault) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.output_tokens,
        "total_tokens": answer.prompt_tokens + answer.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": CACHED if "cache" in fault.flags else 0,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": len(answer.reasoning),
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _reasoning_field(fault: faults.Fault) -> str | None:
    return (
        "reasoning_content"
        if "think" in fault.flags
        else "reasoning"
        if "reasoning" in fault.flags
        else None
    )


def _completion(
    head: dict[str, Any], answer: answers.Answer, fault: faults.Fault, logprobs: bool
) -> dict[str, Any]:
    choices = []
    field = _reasoning_field(fault)
    for index, c in enumerate(answer.candidates):
        message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
        if "refusal" in fault.flags:
            message.update(content=None, refusal=REFUSAL)
        if field:
            message[field] = "".join(answer.reasoning)
        message["annotations"] = []
        lp = None
        if logprobs and "refusal" not in fault.flags:
            content = [_logprob(*t) for t in zip(c.tokens, c.logprobs, c.tops, strict=True)]
            lp = {"content": content, "refusal": None}
        choices.append(
            {"index": index, "message": message, "logprobs": lp, "finish_reason": _finish(c, fault)}
        )
    return {
        **head,
        "object": "chat.completion",
        "choices": choices,
        "usage": _usage(answer, fault),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _events(
    head: dict[str, Any], answer: answers.Answer, fault: faults.Fault, body: dict[str, Any]
) -> list[faults.Event]:
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage"))
    obfuscate = options.get("include_obfuscation", True)
    logprobs = bool(body.get("logprobs")) and "refusal" not in fault.flags
    field = _reasoning_field(fault)

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        out: dict[str, Any] = {
            **head,
            "object": "chat.completion.chunk",
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": [choice],
        }
        if include_usage:
            out["usage"] = None
        if obfuscate:
            out["obfuscation"] = "fAkE"
        return faults.sse(out, separators=(",", ":"))

    events = []
    for index in range(len(answer.candidates)):
        events.append(faults.Event(chunk(index, {"role": "assistant", "content": "", "refusal": None})))
    if field:
        for index, piece in itertools.product(range(len(answer.candidates)), answer.reasoning):
            events.append(faults.Event(chunk(index, {"content": None, field: piece})))
    pieces = [
        [("refusal", REFUSAL)] if "refusal" in fault.flags else [("content", t) for t in c.tokens]
        for c in answer.candidates
    ]
    for step in range(max((len(p) for p in pieces), default=0)):
        for index, (c, ps) in enumerate(zip(answer.candidates, pieces, strict=True)):
            if step < len(ps):
                name, piece = ps[step]
                lp = None
                if logprobs:
                    lp = {"content": [_logprob(piece, c.logprobs[step], c.tops[step])], "refusal": None}
                events.append(faults.Event(chunk(index, {name: piece}, lp=lp), text=True))
    for index, c in enumerate(answer.candidates):
        events.append(faults.Event(chunk(index, {}, _finish(c, fault))))
    if include_usage:
        last = {
            **head,
            "object": "chat.completion.chunk",
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": [],
            "usage": _usage(answer, fault),
        }
        if obfuscate:
            last["obfuscation"] = "fAkE"
        events.append(faults.Event(faults.sse(last, separators=(",", ":"))))
    events.append(faults.Event(b"data: [DONE]\n\n"))
    return events


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The contents of the tool messages that end the conversation."""
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, str(message.get("content")))
    return results


def _tool_turn(body: dict[str, Any], *, answered: bool) -> list[tuple[str, dict[str, Any]]] | None:
    tools = [
        answers.Declared(t["function"]["name"], t["function"].get("parameters") or {})
        for t in body.get("tools") or []
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = choice["function"]["name"]
    turn = answers.tool_turn(
        tools, choice=choice, parallel=body.get("parallel_tool_calls") is not False, answered=answered
    )
    return None if turn is None else turn.calls


def _calls_completion(
    head: dict[str, Any], calls: list[tuple[str, dict[str, Any]]], prompt_tokens: int
) -> dict[str, Any]:
    tool_calls = [
        {
            "id": answers.call_id("call_", int(head["id"].removeprefix("chatcmpl-fake")), k),
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for k, (name, args) in enumerate(calls)
    ]
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": tool_calls}
    message["annotations"] = []
    used = 5 * len(calls)
    return {
        **head,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": used,
            "total_tokens": prompt_tokens + used,
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _call_events(
    head: dict[str, Any],
    calls: list[tuple[str, dict[str, Any]]],
    prompt_tokens: int,
    body: dict[str, Any],
) -> list[faults.Event]:
    """A tool-calling turn streamed as OpenAI does: each call's first delta has its id, type and
    name with empty arguments, then the arguments' JSON in pieces, keyed by the call's index."""
    whole = _calls_completion(head, calls, prompt_tokens)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> faults.Event:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        out = {**head, "object": "chat.completion.chunk", "system_fingerprint": "fp_fake"}
        out["choices"] = [choice]
        if include_usage:
            out["usage"] = None
        return faults.Event(faults.sse(out, separators=(",", ":")), text=bool(delta.get("tool_calls")))

    events = [chunk({"role": "assistant", "content": None, "refusal": None})]
    for k, call in enumerate(whole["choices"][0]["message"]["tool_calls"]):
        first = {"index": k, "id": call["id"], "type": "function"}
        first["function"] = {"name": call["function"]["name"], "arguments": ""}
        events.append(chunk({"tool_calls": [first]}))
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        for piece in (arguments[:half], arguments[half:]):
            events.append(chunk({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}))
    events.append(chunk({}, "tool_calls"))
    if include_usage:
        last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": whole["usage"]}
        events.append(faults.Event(faults.sse(last, separators=(",", ":"))))
    events.append(faults.Event(b"data: [DONE]\n\n"))
    return events


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.")
    model = str(body.get("model", ""))
    fault = faults.record(request, body, model, ["Authorization"])
    if not request.headers.get("Authorization", "").removeprefix("Bearer ").strip():
        return _error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code=None,
        )
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return _error(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if fault == "refuse":
        return _error(
            400,
            "Your request was rejected as a result of our safety system.",
            code="content_policy_violation",
        )
    early = await faults.early(request, fault, WIRE)
    if early is not None:
        return early
    read = faults.read(fault, FLAGS)
    head = {"id": f"chatcmpl-fake{next(_ids)}", "created": int(time.time()), "model": model}
    headers = {"x-request-id": f"req_fake{next(_ids)}"}
    prompt = _prompt(body["messages"])
    results = _tool_results(body["messages"])
    turn = _tool_turn(body, answered=bool(results))
    if turn is not None:
        if body.get("stream"):
            events = _call_events(head, turn, lm.prompt_length(prompt), body)
            return await faults.play(request, events, read, WIRE, headers)
        text = json.dumps(_calls_completion(head, turn, lm.prompt_length(prompt)), indent=2)
        return await faults.whole(request, text.encode(), read, WIRE, headers)
    try:
        if results:
            answer = answers.spoken(answers.results_text(results), lm.prompt_length(prompt))
        else:
            answer = answers.answer(
                read.model,
                prompt,
                _sampling(body),
                reasoning=bool(read.flags & {"think", "reasoning"}),
            )
    except lm.Rejected as exc:
        return _error(400, str(exc))
    if "content-filter" in read.flags:
        for c in answer.candidates:
            del c.tokens[1:], c.logprobs[1:], c.tops[1:]
    if body.get("stream"):
        return await faults.play(request, _events(head, answer, read, body), read, WIRE, headers)
    text = json.dumps(_completion(head, answer, read, bool(body.get("logprobs"))), indent=2)
    return await faults.whole(request, text.encode(), read, WIRE, headers)


if __name__ == "__main__":
    faults.serve([web.post("/v1/chat/completions", chat_completions)])
