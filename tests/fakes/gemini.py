"""A fake Gemini API upstream (`POST /v1beta/models/MODEL:generateContent` and
`:streamGenerateContent?alt=sse`, and the same under /v1, google-genai's default): a real HTTP
server on loopback where the model name (or an `X-Fault` header, which wins) picks the fault.

    python tests/fakes/gemini.py PORT

It answers as generativelanguage.googleapis.com does: GenerateContentResponse objects (indented
JSON), streams of `data: {GenerateContentResponse}` events ended by CRLF CRLF, each chunk with the
usage so far and the last with finishReason (without alt=sse, the chunks as one JSON array), and
errors as {"error": {"code", "message", "status", "details"?}}. The prompt is systemInstruction
and every part's text, one line each; generationConfig's maxOutputTokens, stopSequences,
candidateCount, seed, temperature, responseLogprobs + logprobs (`logprobsResult`, `avgLogprobs`),
responseMimeType application/json with responseSchema or responseJsonSchema, and
thinkingConfig.includeThoughts are honoured (see tests/fakes/answers.py). It requires
`x-goog-api-key` (without: 403 PERMISSION_DENIED, as the real API) and answers 400 to a key sent
as the `key=` query parameter, which the router must never put in a URL.

Faults (streamed and not, unless said), besides those of tests/fakes/faults.py:
  ok                   "Hello from fake", finishReason STOP
  lm, lm-*             the deterministic model of tests/fakes/lm.py (MAX_TOKENS, or STOP)
  resource-exhausted   429 RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo (retryDelay 7s)
                       details, and no Retry-After header
  ...-refuse           200 with promptFeedback.blockReason SAFETY and no candidates
  ...-safety-finish    one token of text, then finishReason SAFETY with safetyRatings
  ...-recitation       one token of text, then finishReason RECITATION
  ...-think            usageMetadata.thoughtsTokenCount 4, and with includeThoughts the thought
                       as parts with `"thought": true` before the text
  ...-cache            usageMetadata.cachedContentTokenCount 64
The in-band error of `stream-error` is a `data: {"error": {...}}` chunk (503 UNAVAILABLE).
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

from aiohttp import web

try:
    from tests.fakes import answers, faults, lm
except ImportError:  # run as a script: python tests/fakes/gemini.py PORT
    import answers  # type: ignore[no-redef]
    import faults  # type: ignore[no-redef]
    import lm  # type: ignore[no-redef]

FLAGS = ("refuse", "safety-finish", "recitation", "think", "cache")
CACHED = 64
SIGNATURE = "CiQBcsjafFakeThoughtSignature0123456789+/w=="
CRLF2 = b"\r\n\r\n"
_ids = itertools.count(1)

_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error_body(status: int, message: str, details: list[Any] | None = None) -> bytes:
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUSES.get(status, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return json.dumps({"error": error}, indent=2).encode()


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, details: list[Any] | None = None
) -> web.Response:
    return web.Response(
        body=_error_body(status, message, details),
        status=status,
        headers={"Content-Type": "application/json; charset=UTF-8", **(headers or {})},
    )


def _exhausted(model: str) -> web.Response:
    quota = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        "quotaDimensions": {"location": "global", "model": model},
        "quotaValue": "10",
    }
    details = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [quota]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"},
    ]
    message = (
        "You exceeded your current quota, please check your plan and billing details. "
        "Please retry in 7.0s."
    )
    return _error(429, message, details=details)


WIRE = faults.Wire(
    error=lambda status, message, headers: _error(status, message, headers),
    context_error=lambda: _error(
        400,
        "The input token count (1048999) exceeds the maximum number of tokens allowed (1048576).",
    ),
    stream_error=faults.sse(
        {
            "error": {
                "code": 503,
                "message": "The model is overloaded. Please try again later.",
                "status": "UNAVAILABLE",
            }
        },
        end=CRLF2,
        separators=(",", ": "),
    ),
    malformed_event=b'data: {"candidates": [{"content": {"parts": [' + CRLF2,
    error_body=_error_body(503, "The model is overloaded. Please try again later."),
)


def _field(config: dict[str, Any], camel: str) -> Any:
    """A generationConfig field, in camelCase or in the snake_case the API accepts too."""
    snake = "".join(f"_{ch.lower()}" if ch.isupper() else ch for ch in camel)
    return config.get(camel, config.get(snake))


def _prompt(body: dict[str, Any]) -> str:
    system = body.get("systemInstruction") or body.get("system_instruction") or {}
    turns = [system, *body["contents"]]
    lines = ["".join(p.get("text", "") for p in t.get("parts", [])) for t in turns]
    return "\n".join(line for line in lines if line)


def _lower_types(schema: Any) -> Any:
    """An OpenAPI-style responseSchema (`"type": "OBJECT"`) as JSON Schema's lower-case types."""
    if isinstance(schema, dict):
        return {
            k: v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_lower_types(v) for v in schema]
    return schema


def _sampling(config: dict[str, Any]) -> answers.Sampling:
    json_format = None
    if _field(config, "responseMimeType") == "application/json":
        schema = _field(config, "responseJsonSchema")
        if schema is None and _field(config, "responseSchema") is not None:
            schema = _lower_types(_field(config, "responseSchema"))
        json_format = (
            {"type": "json_object"}
            if schema is None
            else {"type": "json_schema", "json_schema": {"schema": schema}}
        )
    return answers.Sampling(
        max_tokens=_field(config, "maxOutputTokens"),
        stops=tuple(_field(config, "stopSequences") or ()),
        n=_field(config, "candidateCount") or 1,
        seed=_field(config, "seed"),
        temperature=_field(config, "temperature"),
        top_logprobs=(_field(config, "logprobs") or 0) if _field(config, "responseLogprobs") else None,
        json=json_format,
    )


_SAFETY = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
]


def _finish(candidate: answers.Candidate, fault: faults.Fault) -> str:
    if "safety-finish" in fault.flags:
        return "SAFETY"
    if "recitation" in fault.flags:
        return "RECITATION"
    return "MAX_TOKENS" if candidate.finish == "length" else "STOP"


def _usage(
    answer: answers.Answer, fault: faults.Fault, output: int | None = None, thoughts: int | None = None
) -> dict[str, Any]:
    """usageMetadata: with `output` (and `thoughts`) the counts so far, else the whole answer's."""
    if output is None:
        output = sum(len(c.tokens) for c in answer.candidates)
    thoughts = len(answer.reasoning) if thoughts is None else thoughts
    prompt = answer.prompt_tokens
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if "cache" in fault.flags:
        usage["cachedContentTokenCount"] = CACHED
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": CACHED}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _logprobs(c: answers.Candidate, start: int, end: int, k: int) -> dict[str, Any]:
    def entry(token: str, value: float) -> dict[str, Any]:
        return {"token": token, "tokenId": answers.token_id(token), "logProbability": value}

    result: dict[str, Any] = {}
    if k:
        result["topCandidates"] = [
            {"candidates": [entry(t, v) for t, v in tops]} for tops in c.tops[start:end]
        ]
    chosen = list(zip(c.tokens, c.logprobs, strict=True))[start:end]
    result["chosenCandidates"] = [entry(t, v) for t, v in chosen]
    result["logProbabilitySum"] = sum(c.logprobs[start:end])
    return result


def _shows_thoughts(config: dict[str, Any]) -> bool:
    return bool(_field(_field(config, "thinkingConfig") or {}, "includeThoughts"))


def _response(
    head: dict[str, Any], answer: answers.Answer, fault: faults.Fault, config: dict[str, Any]
) -> dict[str, Any]:
    if "refuse" in fault.flags:
        return _blocked(head, answer, fault)
    sampling = _sampling(config)
    candidates = []
    for index, c in enumerate(answer.candidates):
        parts: list[dict[str, Any]] = []
        if answer.reasoning and _shows_thoughts(config):
            parts.append({"text": "".join(answer.reasoning), "thought": True})
        parts.append({"text": c.text})
        candidate: dict[str, Any] = {
            "content": {"parts": parts, "role": "model"},
            "finishReason": _finish(c, fault),
        }
        if "safety-finish" in fault.flags:
            candidate["safetyRatings"] = _SAFETY
        if sampling.top_logprobs is not None:
            candidate["avgLogprobs"] = sum(c.logprobs) / len(c.logprobs) if c.logprobs else 0.0
            candidate["logprobsResult"] = _logprobs(c, 0, len(c.tokens), sampling.top_logprobs)
        candidate["index"] = index
        candidates.append(candidate)
    return {"candidates": candidates, "usageMetadata": _usage(answer, fault), **head}


def _blocked(head: dict[str, Any], answer: answers.Answer, fault: faults.Fault) -> dict[str, Any]:
    feedback = {"blockReason": "SAFETY", "safetyRatings": _SAFETY}
    usage = _usage(answer, fault, output=0, thoughts=0)
    del usage["candidatesTokenCount"]
    return {"promptFeedback": feedback, "usageMetadata": usage, **head}


def _chunks(
    head: dict[str, Any], answer: answers.Answer, fault: faults.Fault, config: dict[str, Any]
) -> list[dict[str, Any]]:
    """The stream's GenerateContentResponse chunks: the thought, then a token of every candidate
    a chunk, the usage so far in each, finishReason on each candidate's last."""
    if "refuse" in fault.flags:
        return [_blocked(head, answer, fault)]
    sampling = _sampling(config)
    out: list[dict[str, Any]] = []
    thoughts = 0
    if answer.reasoning and _shows_thoughts(config):
        for piece in answer.reasoning:
            thoughts += 1
            thought = {"content": {"parts": [{"text": piece, "thought": True}], "role": "model"}}
            usage = _usage(answer, fault, 0, thoughts)
            out.append({"candidates": [{**thought, "index": 0}], "usageMetadata": usage, **head})
    thoughts = len(answer.reasoning)
    steps = max([1, *(len(c.tokens) for c in answer.candidates)])
    output = 0
    for step in range(steps):
        candidates = []
        for index, c in enumerate(answer.candidates):
            last = step == max(len(c.tokens), 1) - 1
            if step >= max(len(c.tokens), 1):
                continue
            text = c.tokens[step] if c.tokens else ""
            output += 1 if c.tokens else 0
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
            if last:
                candidate["finishReason"] = _finish(c, fault)
                if "safety-finish" in fault.flags:
                    candidate["safetyRatings"] = _SAFETY
            if sampling.top_logprobs is not None and c.tokens:
                candidate["logprobsResult"] = _logprobs(c, step, step + 1, sampling.top_logprobs)
            candidate["index"] = index
            candidates.append(candidate)
        out.append(
            {"candidates": candidates, "usageMetadata": _usage(answer, fault, output, thoughts), **head}
        )
    return out


def _tool_problem(contents: list[dict[str, Any]], thinking: bool) -> str | None:
    """The API's rules for function calling in a conversation: a thinking model's calls come back
    with their thought signatures, and each functionResponse names a function called before."""
    called: set[str] = set()
    for i, turn in enumerate(contents):
        parts = turn.get("parts", [])
        calls = [p for p in parts if "functionCall" in p]
        if thinking and calls and not _signed(_field(calls[0], "thoughtSignature")):
            return (
                "Function call is missing a thought_signature in functionCall parts. This is "
                "required for tools to work correctly, and missing thought_signature may lead to "
                f"degraded model performance. Additional data, function call "
                f"`default_api:{calls[0]['functionCall'].get('name')}` , position {i + 1}."
            )
        called.update(p["functionCall"].get("name") for p in calls)
        for part in parts:
            if "functionResponse" in part and part["functionResponse"].get("name") not in called:
                return (
                    f"* GenerateContentRequest.contents[{i}].parts: a functionResponse names "
                    f"{part['functionResponse'].get('name')!r}, which no earlier functionCall did\n"
                )
    return None


def _signed(signature: Any) -> bool:
    """The part carries the fake's signature (bytes in proto JSON: either base64 alphabet)."""
    if not isinstance(signature, str):
        return False
    try:
        return base64.b64decode(signature.replace("-", "+").replace("_", "/")) == base64.b64decode(
            SIGNATURE
        )
    except ValueError:
        return False


def _tool_results(contents: list[dict[str, Any]]) -> list[str]:
    responses = [p["functionResponse"] for p in contents[-1].get("parts", []) if "functionResponse" in p]
    return [
        str(r["response"]["result"])
        if set(r.get("response") or {}) == {"result"}
        else json.dumps(r.get("response"))
        for r in responses
    ]


def _tool_turn(body: dict[str, Any], *, answered: bool) -> list[tuple[str, dict[str, Any]]] | None:
    declared = [
        answers.Declared(  # (proto JSON: either spelling; google-genai sends snake_case here)
            d["name"],
            _field(d, "parametersJsonSchema") or d.get("parameters") or {},
        )
        for tool in body.get("tools") or []
        for d in tool.get("functionDeclarations") or tool.get("function_declarations") or []
    ]
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode = config.get("mode", "AUTO")
    allowed = config.get("allowedFunctionNames") or []
    choice = {"AUTO": "auto", "ANY": "required", "NONE": "none"}.get(mode, "auto")
    if mode == "ANY" and len(allowed) == 1:
        choice = allowed[0]
    turn = answers.tool_turn(declared, choice=choice, parallel=True, answered=answered)
    return None if turn is None else turn.calls


def _calls_response(
    head: dict[str, Any],
    answer: answers.Answer,
    calls: list[tuple[str, dict[str, Any]]],
    fault: faults.Fault,
) -> dict[str, Any]:
    """A turn of function calls (whole, also as a stream's one chunk): finishReason STOP, a
    thinking model's first call signed."""
    parts: list[dict[str, Any]] = []
    for name, args in calls:
        part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
        if "think" in fault.flags and not parts:
            part["thoughtSignature"] = SIGNATURE
        parts.append(part)
    candidate = {"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}
    used = 5 * len(calls)
    usage = _usage(answers.Answer([], answer.prompt_tokens, answer.reasoning), fault, used)
    return {"candidates": [candidate], "usageMetadata": usage, **head}


def _says(chunk: dict[str, Any]) -> bool:
    """The chunk carries answer text (not only a thought)."""
    parts = [p for c in chunk.get("candidates", []) for p in c.get("content", {}).get("parts", [])]
    return any((p.get("text") and not p.get("thought")) or "functionCall" in p for p in parts)


async def models(request: web.Request) -> web.StreamResponse:
    model, _, method = request.match_info["target"].partition(":")
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "Invalid JSON payload received.")
    fault = faults.record(request, body, model, ["x-goog-api-key"])
    if "key" in request.query:
        return _error(400, "fake: the API key came as the key= query parameter; send x-goog-api-key")
    if not request.headers.get("x-goog-api-key"):
        return _error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
        )
    if method not in ("generateContent", "streamGenerateContent"):
        return _error(404, f"Method not found: {method}")
    if not isinstance(body.get("contents"), list) or not body["contents"]:
        return _error(400, "* GenerateContentRequest.contents: contents is not specified\n")
    if fault == "resource-exhausted":
        return _exhausted(model)
    early = await faults.early(request, fault, WIRE)
    if early is not None:
        return early
    read = faults.read(fault, FLAGS)
    config = body.get("generationConfig") or body.get("generation_config") or {}
    try:
        answer = answers.answer(
            read.model, _prompt(body), _sampling(config), reasoning="think" in read.flags
        )
    except lm.Rejected as exc:
        return _error(400, str(exc))
    if read.flags & {"safety-finish", "recitation"}:
        for c in answer.candidates:
            del c.tokens[1:], c.logprobs[1:], c.tops[1:]
    head = {"modelVersion": model, "responseId": f"fAkE{next(_ids):08d}"}
    json_type = {"Content-Type": "application/json; charset=UTF-8"}
    problem = _tool_problem(body["contents"], "think" in read.flags)
    if problem is not None:
        return _error(400, problem)
    results = _tool_results(body["contents"])
    calls = _tool_turn(body, answered=bool(results))
    if calls is not None:
        chunks = [_calls_response(head, answer, calls, read)]
    elif results:
        answer = answers.spoken(answers.results_text(results), answer.prompt_tokens)
    if method == "generateContent":
        whole = chunks[0] if calls is not None else _response(head, answer, read, config)
        body_text = json.dumps(whole, indent=2).encode()
        return await faults.whole(request, body_text, read, WIRE, json_type)
    if calls is None:
        chunks = _chunks(head, answer, read, config)
    if request.query.get("alt") != "sse":  # a JSON array, streamed as it grows
        array = ("[" + ",\r\n".join(json.dumps(c, indent=2) for c in chunks) + "]").encode()
        return await faults.whole(request, array, read, WIRE, json_type)
    events = [
        faults.Event(faults.sse(c, end=CRLF2, separators=(",", ": ")), text=_says(c)) for c in chunks
    ]
    return await faults.play(request, events, read, WIRE)


if __name__ == "__main__":
    faults.serve([web.post("/v1beta/models/{target}", models), web.post("/v1/models/{target}", models)])
