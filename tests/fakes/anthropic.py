"""A fake Anthropic Messages upstream (`POST /v1/messages`): a real HTTP server on loopback where
the model name (or an `X-Fault` header, which wins) picks the fault.

    python tests/fakes/anthropic.py PORT

It answers as api.anthropic.com does: `message` objects with content blocks, streams of named
events in the API's order (message_start with the input usage, content_block_start, a ping,
content_block_delta as text_delta, thinking_delta and signature_delta, content_block_stop,
message_delta with the stop reason and the cumulative output_tokens, message_stop), and errors
as {"type": "error", "error": {"type", "message"}, "request_id"}. The prompt is `system` and every
message's text, one line each; `max_tokens` (required, as `messages`), `stop_sequences`,
`output_config.format` (json_schema) and `thinking` (enabled with budget_tokens, or adaptive;
`display: omitted` leaves the thinking empty but signed) are honoured (see
tests/fakes/answers.py). There is no n, seed or logprobs, and the answer is greedy (the same
prompt, the same answer); `temperature`, which the anthropic SDK 2.15 no longer offers, is taken
and ignored. It requires a key, as `x-api-key` or as
`Authorization: Bearer` (which the anthropic SDK 2.15 sends), 401 without, and
`anthropic-version` (400 without).

Faults (streamed and not, unless said), besides those of tests/fakes/faults.py:
  ok                  "Hello from fake", stop_reason end_turn
  lm, lm-*            the deterministic model of tests/fakes/lm.py (stop_reason max_tokens,
                      stop_sequence with the `stop_sequence` that matched, or end_turn)
  overloaded          529 overloaded_error
  ...-think           with `thinking` enabled or adaptive in the request, a thinking block (its
                      signature streamed as signature_delta) before the text
  ...-refuse          one token of text, then stop_reason refusal (and stop_details)
  ...-window          stop_reason model_context_window_exceeded
  ...-cache           usage with cache_creation_input_tokens 32 and cache_read_input_tokens 64
The in-band error of `stream-error` is `event: error` with an overloaded_error.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from aiohttp import web

try:
    from tests.fakes import answers, faults, lm
except ImportError:  # run as a script: python tests/fakes/anthropic.py PORT
    import answers  # type: ignore[no-redef]
    import faults  # type: ignore[no-redef]
    import lm  # type: ignore[no-redef]

FLAGS = ("think", "refuse", "window", "cache")
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxmYWtlLXNpZ25hdHVyZQ=="
CREATED, CACHED = 32, 64
_ids = itertools.count(1)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error_body(status: int, message: str) -> dict[str, Any]:
    error = {"type": _TYPES.get(status, "api_error"), "message": message}
    return {"type": "error", "error": error, "request_id": f"req_fake{next(_ids)}"}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = _error_body(status, message)
    headers = {"request-id": body["request_id"], **(headers or {})}
    return web.Response(
        body=_compact(body), status=status, content_type="application/json", headers=headers
    )


_OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
WIRE = faults.Wire(
    error=lambda status, message, headers: _error(status, message, headers),
    context_error=lambda: _error(400, "prompt is too long: 208497 tokens > 200000 maximum"),
    stream_error=b"event: error\ndata: " + _compact(_OVERLOADED) + b"\n\n",
    malformed_event=b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,\n\n',
    error_body=_compact(_OVERLOADED),
)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if b.get("type") == "text")
    return str(content or "")


def _prompt(body: dict[str, Any]) -> str:
    lines = [_text(body.get("system"))] + [_text(m.get("content")) for m in body["messages"]]
    return "\n".join(line for line in lines if line)


_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _tool_problem(body: dict[str, Any]) -> str | None:
    """The API's rules for tool use in a conversation: every tool_use answered by a tool_result
    in the next (user) turn, ids of its pattern, and with thinking on, an assistant turn that
    calls tools keeps its (signed) thinking block first."""
    messages = body["messages"]
    thinking = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    for i, message in enumerate(messages):
        blocks = _blocks(message)
        used = [b["id"] for b in blocks if b.get("type") == "tool_use"]
        for b in blocks:
            for key in ("id", "tool_use_id"):
                if b.get("type") in ("tool_use", "tool_result") and not _TOOL_ID.match(
                    str(b.get(key, "x"))
                ):
                    return f"messages.{i}.content: String should match pattern '^[a-zA-Z0-9_-]+$'"
        if not used:
            continue
        if thinking and i == len(messages) - 2 and blocks[0].get("type") != "thinking":
            return (
                f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but "
                "found `tool_use`. When `thinking` is enabled, a final `assistant` message must "
                "start with a thinking block."
            )
        if thinking and blocks[0].get("type") == "thinking" and blocks[0].get("signature") != SIGNATURE:
            return f"messages.{i}.content.0: Invalid `signature` in `thinking` block"
        after = _blocks(messages[i + 1]) if i + 1 < len(messages) else []
        answered = {b.get("tool_use_id") for b in after if b.get("type") == "tool_result"}
        if set(used) - answered:
            return (
                f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(sorted(set(used) - answered))}. Each `tool_use` "
                "block must have a corresponding `tool_result` block in the next message."
            )
    return None


def _invalid(body: dict[str, Any]) -> str | None:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "messages: Field required"
    if (problem := _tool_problem(body)) is not None:
        return problem
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    thinking = body.get("thinking") or {}
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if body["max_tokens"] <= budget:
            return "`max_tokens` must be greater than `thinking.budget_tokens`."
    return None


def _stop(candidate: answers.Candidate, fault: faults.Fault) -> tuple[str, str | None]:
    if "refuse" in fault.flags:
        return "refusal", None
    if "window" in fault.flags:
        return "model_context_window_exceeded", None
    if candidate.finish == "stop_sequence":
        return "stop_sequence", candidate.stop_sequence
    return ("max_tokens" if candidate.finish == "length" else "end_turn"), None


def _input_usage(answer: answers.Answer, fault: faults.Fault) -> dict[str, Any]:
    created, cached = (CREATED, CACHED) if "cache" in fault.flags else (0, 0)
    return {
        "input_tokens": answer.prompt_tokens,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": cached,
        "cache_creation": {"ephemeral_5m_input_tokens": created, "ephemeral_1h_input_tokens": 0},
    }


_REFUSAL = {"type": "refusal", "category": None, "explanation": None}


def _message(
    head: dict[str, Any], answer: answers.Answer, fault: faults.Fault, omitted: bool
) -> dict[str, Any]:
    c = answer.candidates[0]
    content: list[dict[str, Any]] = []
    if answer.reasoning:
        thought = "" if omitted else "".join(answer.reasoning)
        content.append({"type": "thinking", "thinking": thought, "signature": SIGNATURE})
    content.append({"type": "text", "text": c.text})
    reason, sequence = _stop(c, fault)
    usage = {**_input_usage(answer, fault), "output_tokens": answer.output_tokens}
    message = {
        **head,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {**usage, "service_tier": "standard"},
    }
    if reason == "refusal":
        message["stop_details"] = _REFUSAL
    return message


_TEXT = frozenset({"text_delta"})  # (a text answer: its thinking comes before the cut)
_CALLING = frozenset({"thinking_delta", "signature_delta", "input_json_delta"})


def _event(name: str, data: dict[str, Any], text: bool = False) -> faults.Event:
    return faults.Event(faults.sse(data, name, separators=(",", ":")), text)


def _block_events(
    index: int,
    opened: dict[str, Any],
    deltas: list[dict[str, Any]],
    answering: frozenset[str],
    *,
    ping: bool = False,
) -> list[faults.Event]:
    """One content block streamed: its start (then a ping, the stream's first), its deltas (those
    of the `answering` types carry the answer: where stream-error cuts), its stop."""
    start = {"type": "content_block_start", "index": index, "content_block": opened}
    events = [_event("content_block_start", start)]
    if ping:
        events.append(_event("ping", {"type": "ping"}))
    for delta in deltas:
        data = {"type": "content_block_delta", "index": index, "delta": delta}
        events.append(_event("content_block_delta", data, text=delta["type"] in answering))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def _events(
    head: dict[str, Any], answer: answers.Answer, fault: faults.Fault, omitted: bool
) -> list[faults.Event]:
    c = answer.candidates[0]
    usage = {**_input_usage(answer, fault), "output_tokens": 1, "service_tier": "standard"}
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    events = [_event("message_start", {"type": "message_start", "message": start})]
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    if answer.reasoning:
        thought = [] if omitted else answer.reasoning
        deltas = [{"type": "thinking_delta", "thinking": t} for t in thought]
        deltas.append({"type": "signature_delta", "signature": SIGNATURE})
        blocks.append(({"type": "thinking", "thinking": "", "signature": ""}, deltas))
    blocks.append(({"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in c.tokens]))
    for index, (block, deltas) in enumerate(blocks):
        events += _block_events(index, block, deltas, _TEXT, ping=index == 0)
    reason, sequence = _stop(c, fault)
    ending: dict[str, Any] = {"stop_reason": reason, "stop_sequence": sequence}
    if reason == "refusal":
        ending["stop_details"] = _REFUSAL
    total = {"output_tokens": answer.output_tokens}  # cumulative: the whole answer's
    events.append(_event("message_delta", {"type": "message_delta", "delta": ending, "usage": total}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """The results in the last (user) turn's tool_result blocks."""
    return [_text(b.get("content")) for b in _blocks(messages[-1]) if b.get("type") == "tool_result"]


def _tool_turn(body: dict[str, Any], *, answered: bool) -> list[tuple[str, dict[str, Any]]] | None:
    tools = [answers.Declared(t["name"], t.get("input_schema") or {}) for t in body.get("tools") or []]
    choice = body.get("tool_choice") or {}
    named = {"auto": "auto", "any": "required", "none": "none"}.get(choice.get("type", "auto"))
    turn = answers.tool_turn(
        tools,
        choice=choice.get("name") if choice.get("type") == "tool" else named,
        parallel=not choice.get("disable_parallel_tool_use"),
        answered=answered,
    )
    return None if turn is None else turn.calls


def _thinking_block(answer: answers.Answer, omitted: bool) -> list[dict[str, Any]]:
    if not answer.reasoning:
        return []
    thought = "" if omitted else "".join(answer.reasoning)
    return [{"type": "thinking", "thinking": thought, "signature": SIGNATURE}]


def _uses(head: dict[str, Any], calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    turn = int(head["id"].removeprefix("msg_fake"))
    return [
        {"type": "tool_use", "id": answers.call_id("toolu_fake", turn, k), "name": name, "input": args}
        for k, (name, args) in enumerate(calls)
    ]


def _calls_message(
    head: dict[str, Any],
    answer: answers.Answer,
    calls: list[tuple[str, dict[str, Any]]],
    fault: faults.Fault,
    omitted: bool,
) -> dict[str, Any]:
    used = len(answer.reasoning) + 5 * len(calls)
    return {
        **head,
        "content": _thinking_block(answer, omitted) + _uses(head, calls),
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {**_input_usage(answer, fault), "output_tokens": used, "service_tier": "standard"},
    }


def _call_events(
    head: dict[str, Any],
    answer: answers.Answer,
    calls: list[tuple[str, dict[str, Any]]],
    fault: faults.Fault,
    omitted: bool,
) -> list[faults.Event]:
    """A tool-using turn streamed: each tool_use block starts with its id, name and empty input,
    and its input's JSON follows as input_json_delta pieces."""

    whole = _calls_message(head, answer, calls, fault, omitted)
    usage = {**_input_usage(answer, fault), "output_tokens": 1, "service_tier": "standard"}
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    events = [_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(whole["content"]):
        if block["type"] == "thinking":
            opened = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block["thinking"]}]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        else:
            opened = {**block, "input": {}}
            text = json.dumps(block["input"])
            half = len(text) // 2
            deltas = [
                {"type": "input_json_delta", "partial_json": piece}
                for piece in (text[:half], text[half:])
            ]
        events += _block_events(index, opened, deltas, _CALLING)
    ending = {"stop_reason": "tool_use", "stop_sequence": None}
    total = {"output_tokens": whole["usage"]["output_tokens"]}
    events.append(_event("message_delta", {"type": "message_delta", "delta": ending, "usage": total}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


async def messages(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "There was an error parsing the body of your request.")
    model = str(body.get("model", ""))
    fault = faults.record(request, body, model, ["x-api-key", "Authorization", "anthropic-version"])
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not request.headers.get("x-api-key") and not bearer:
        return _error(401, "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return _error(400, "anthropic-version: header is required")
    invalid = _invalid(body)
    if invalid is not None:
        return _error(400, invalid)
    if fault == "overloaded":
        return _error(529, "Overloaded")
    early = await faults.early(request, fault, WIRE)
    if early is not None:
        return early
    read = faults.read(fault, FLAGS)
    stops = body.get("stop_sequences") or ()
    fmt = (body.get("output_config") or {}).get("format") or {}
    thinking = body.get("thinking") or {}
    thinks = "think" in read.flags and thinking.get("type") in ("enabled", "adaptive")
    sampling = answers.Sampling(
        max_tokens=body["max_tokens"] - (len(answers.REASONING) if thinks else 0),  # thought counts
        stops=tuple(stops),
        temperature=body.get("temperature"),
        greedy=True,
        json={"type": "json_schema", "json_schema": {"schema": fmt.get("schema", {})}}
        if fmt.get("type") == "json_schema"
        else None,
    )
    try:
        answer = answers.answer(read.model, _prompt(body), sampling, reasoning=thinks)
    except lm.Rejected as exc:
        return _error(400, str(exc))
    omitted = thinks and thinking.get("display") == "omitted"
    head = {"id": f"msg_fake{next(_ids):020d}", "type": "message", "role": "assistant", "model": model}
    headers = {"request-id": f"req_fake{next(_ids)}"}
    results = _tool_results(body["messages"])
    calls = _tool_turn(body, answered=bool(results))
    if calls is not None:
        answer = answers.Answer([], answer.prompt_tokens, answer.reasoning)
        if body.get("stream"):
            events = _call_events(head, answer, calls, read, omitted)
            return await faults.play(request, events, read, WIRE, headers)
        whole = _calls_message(head, answer, calls, read, omitted)
        return await faults.whole(request, _compact(whole), read, WIRE, headers)
    if results:
        answer = answers.spoken(answers.results_text(results), answer.prompt_tokens)
    if "refuse" in read.flags:
        c = answer.candidates[0]
        del c.tokens[1:], c.logprobs[1:], c.tops[1:]
    if body.get("stream"):
        return await faults.play(request, _events(head, answer, read, omitted), read, WIRE, headers)
    return await faults.whole(
        request, _compact(_message(head, answer, read, omitted)), read, WIRE, headers
    )


if __name__ == "__main__":
    faults.serve([web.post("/v1/messages", messages)])
