"""A fake OpenAI-compatible upstream: a real HTTP server on loopback where the model name (or an
`X-Fault` header, which wins) picks the fault.

    python tests/fakes/upstream.py PORT

Faults (streamed and not, unless said):
  ok                  answers; the text echoes the request body it received (asked for logprobs,
                      it sends them: the text as one token, as every answering fault here does)
  status-NNN          answers NNN with an OpenAI-style error body; 429 carries `Retry-After: 7`
  status-429-date     429 with Retry-After as an HTTP date 3 s ahead
  status-429-bare     429 without Retry-After
  retry-after-N       429 with `Retry-After: N`
  context-400         400 with code context_length_exceeded
  refuse              400 with code content_policy_violation
  hang                never answers (no headers)
  hang-after-2        stream: two chunks, then silence (non-stream: as `hang`)
  reset-before        closes the connection without answering
  reset-after-2       stream: two chunks, then closes; non-stream: half a body, then closes
  malformed           200 with a body that is not JSON (or SSE)
  stream-truncated    stream: two chunks, then the end without [DONE]
  stream-error        stream: one chunk, then an in-band error event (non-stream: 200 {"error"})
  no-finish           stream: chunks and [DONE], but no finish_reason
  empty-stream        stream: [DONE] and nothing else
  big                 a 5 MB completion text
  slow-first          waits 2 s, then answers
  slow-ok-MS          waits MS milliseconds, then answers
  slow-stream         one chunk every 0.2 s, 100 of them (slow-stream-N: N of them)
  wait-close          holds the request until the client goes, and notes when (time.time())
  echo-NNN            answers NNN (200: an in-band error) with an error message quoting every
                      request header, as a proxy in between might; streamed: one chunk, then an
                      in-band error event quoting them
  redirect-NNN        answers NNN with `Location: /elsewhere/v1/completions` (which counts the
                      requests it gets in `redirected`)
  switch              whatever `POST /_control {"switch": FAULT}` set last (default ok)
  say-prompt          answers with the (string) prompt as its text, cut to `max_tokens` characters
                      (then finish_reason `length`): a test chooses the answer by its prompt
  lm, lm-*            a deterministic model honouring every parameter (see tests/fakes/lm.py)
  lm...-CUT-after-N   the same model, its stream cut after N text chunks: CUT is `reset` (the
                      connection closes), `hang` (silence), `error` (an in-band error event),
                      `truncated` (the end, without [DONE]) or `nofinish` ([DONE], no finish)
  lm...-lostend       the whole stream, finish reasons included, then the connection closes
                      before the usage chunk and [DONE]
  lm...-pairs...      streams two tokens a chunk, each chunk with the usage so far (as vLLM's
                      continuous_usage_stats)
  lm...-reasoning...  the first chunk also carries `reasoning` in a field of its own

Tokenizer endpoints, whose tokens are a text's UTF-8 bytes (a document start, 256, first when
asked for), the model name (or `X-Fault`) choosing `status-NNN` as for completions, `nested` (an
answer nested 100,000 deep) or `bad-ids` (token ids and lengths no tokenizer has):
  vLLM's              POST /tokenize, POST /detokenize, GET /tokenizer_info
  llama.cpp's server  POST /llamacpp/tokenize, POST /llamacpp/detokenize

`GET /_stats`: requests, hits per model, distinct client connections, streams whose client left,
close times noted by `wait-close`, and the last body and headers. `POST /_reset` clears them.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import sys
import time
from collections import Counter
from typing import Any

from aiohttp import web

try:
    from tests.fakes import faults, lm
except ImportError:  # run as a script: python tests/fakes/upstream.py PORT
    import faults  # type: ignore[no-redef]
    import lm  # type: ignore[no-redef]

stats: dict[str, Any] = {}
control: dict[str, str] = {"switch": "ok"}


def reset() -> None:
    stats.update(
        requests=0,
        hits=Counter(),
        peers=set(),
        client_gone=0,
        closed_at=[],
        last_body=None,
        last_headers=None,
        redirected=0,
        tokenizer_bodies=[],
    )


reset()


def _logprobs(text: str, k: int | None) -> dict[str, Any] | None:
    """What an upstream asked for `logprobs: k` sends: here the text as one token."""
    if k is None or not text:
        return None
    top = [{text: -0.5}] if k else None
    return {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": top, "text_offset": [0]}


def _completion(model: str, text: str, finish: str = "stop", k: int | None = None) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": _logprobs(text, k), "finish_reason": finish}
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [choice],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _chunk(model: str, text: str, finish: str | None = None, k: int | None = None) -> bytes:
    body = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": _logprobs(text, k), "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage_chunk(model: str) -> bytes:
    usage = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    return b"data: " + json.dumps(usage).encode() + b"\n\n"


_close = faults.close


async def _wait_for_close(request: web.Request, limit: float = 30.0) -> None:
    await faults.wait_for_close(request, limit, stats["closed_at"])


async def completions(request: web.Request) -> web.StreamResponse:
    stats["requests"] += 1
    peer = request.transport.get_extra_info("peername") if request.transport else None
    stats["peers"].add(str(peer))
    body = await request.json()
    stats["last_body"] = body
    stats["last_headers"] = dict(request.headers)
    model = body.get("model", "")
    stats["hits"][model] += 1
    fault = request.headers.get("X-Fault") or model
    if fault == "switch":
        fault = control["switch"]
    stream = bool(body.get("stream"))
    if fault == "lm" or fault.startswith("lm-"):
        return await _lm(request, fault, body, stream)

    if fault.startswith("echo-"):
        return await _echo(request, int(fault[5:]), stream)
    if fault.startswith("redirect-"):
        location = "/elsewhere/v1/completions"
        return web.Response(status=int(fault[9:]), headers={"Location": location})
    if fault.startswith("retry-after-"):
        error = {"error": {"message": "fake rate limit", "type": "fake", "code": None}}
        return web.json_response(error, status=429, headers={"Retry-After": fault[12:]})
    if fault.startswith("status-"):
        code = int(fault.split("-")[1])
        headers = {}
        if fault == "status-429-date":
            headers["Retry-After"] = email.utils.formatdate(time.time() + 3, usegmt=True)
        elif fault == "status-429-bare":
            pass
        elif code == 429:
            headers["Retry-After"] = "7"
        error = {"error": {"message": f"fake failure {code}", "type": "fake", "code": None}}
        return web.json_response(error, status=code, headers=headers)
    if fault in ("context-400", "refuse"):
        code = "context_length_exceeded" if fault == "context-400" else "content_policy_violation"
        message = f"fake {code}"
        return web.json_response({"error": {"message": message, "code": code}}, status=400)
    if fault == "hang" or (fault == "hang-after-2" and not stream):
        await _wait_for_close(request, 3600)  # (when the router gave up: `closed_at`)
        return web.Response()
    if fault == "reset-before":
        _close(request)
        return web.Response()
    if fault == "wait-close":
        await _wait_for_close(request)
        return web.Response()
    if fault == "malformed":
        return web.Response(text="{not json", content_type="application/json")
    if fault == "slow-first":
        await asyncio.sleep(2)
    if fault.startswith("slow-ok-"):
        await asyncio.sleep(int(fault.rsplit("-", 1)[1]) / 1000)
    if fault == "say-prompt":
        return await _say_prompt(request, model, body, stream)
    text = "x" * 5_000_000 if fault == "big" else None
    k = body.get("logprobs")  # honoured: an upstream asked for logprobs sends them

    if not stream:
        if fault == "stream-error":
            return web.json_response({"error": {"message": "fake in-band failure"}})
        if fault == "reset-after-2":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 1000
            await response.prepare(request)
            await response.write(b'{"choices": [')
            _close(request)
            return response
        return web.json_response(_completion(model, text or json.dumps(body, sort_keys=True), k=k))

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        if fault == "slow-stream" or fault.startswith("slow-stream-"):
            for i in range(int(fault[12:] or 100)):
                await response.write(_chunk(model, f"t{i} ", k=k))
                await asyncio.sleep(0.2)
        elif fault in ("stream-truncated", "reset-after-2", "hang-after-2"):
            await response.write(_chunk(model, "one ", k=k))
            await response.write(_chunk(model, "two ", k=k))
            if fault == "hang-after-2":
                await _wait_for_close(request, limit=3600)
            _close(request)
            return response
        elif fault == "stream-error":
            await response.write(_chunk(model, "one ", k=k))
            await response.write(b'data: {"error": {"message": "fake mid-stream failure"}}\n\n')
            return response
        elif fault == "empty-stream":
            await response.write(b"data: [DONE]\n\n")
            return response
        elif fault == "no-finish":
            await response.write(_chunk(model, "one ", k=k))
            await response.write(b"data: [DONE]\n\n")
            return response
        elif text is not None:
            for _ in range(5):
                await response.write(_chunk(model, text[:1_000_000], k=k))
        else:
            for word in ("Hello", " from", " fake"):
                await response.write(_chunk(model, word, k=k))
        await response.write(_chunk(model, "", "stop"))
        await response.write(_usage_chunk(model))
        await response.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        stats["client_gone"] += 1
        raise
    return response


async def _echo(request: web.Request, status: int, stream: bool) -> web.StreamResponse:
    said = "proxy saw: " + "; ".join(f"{k}: {v}" for k, v in request.headers.items())
    error = json.dumps({"error": {"message": said, "type": "fake", "code": None}})
    if not stream:
        return web.Response(text=error, status=status, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk("echo", "one "))
    await response.write(b"data: " + error.encode() + b"\n\n")
    return response


async def elsewhere(request: web.Request) -> web.Response:
    stats["redirected"] += 1
    return web.json_response(_completion("elsewhere", "redirected"))


async def _say_prompt(
    request: web.Request, model: str, body: dict[str, Any], stream: bool
) -> web.StreamResponse:
    text, finish = str(body.get("prompt", "")), "stop"
    limit = body.get("max_tokens")
    if isinstance(limit, int) and len(text) > limit:
        text, finish = text[:limit], "length"
    if not stream:
        return web.json_response(_completion(model, text, finish, k=body.get("logprobs")))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk(model, text, k=body.get("logprobs")))
    await response.write(_chunk(model, "", finish))
    await response.write(_usage_chunk(model))
    await response.write(b"data: [DONE]\n\n")
    return response


_CUT = re.compile(
    r"^(?P<model>lm.*?)(?:-(?P<cut>reset|hang|error|truncated|nofinish)-after-(?P<n>\d+)|-lostend)$"
)


async def _lm(
    request: web.Request, model: str, body: dict[str, Any], stream: bool
) -> web.StreamResponse:
    cut = _CUT.match(model)
    if cut is not None:
        model = cut["model"]
    pairs, reasoning = "-pairs" in model, "-reasoning" in model
    model = model.replace("-pairs", "").replace("-reasoning", "")
    try:
        answer = lm.complete(model, body)
    except lm.Rejected as exc:
        error = {"error": {"message": str(exc), "type": "invalid_request_error", "code": None}}
        return web.json_response(error, status=400)
    if not stream:
        return web.json_response(answer)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = lm.chunks(answer, include_usage)
    if pairs:
        chunks = _in_pairs(chunks, answer["usage"]["prompt_tokens"])
    if reasoning:
        chunks[0]["choices"][0]["reasoning"] = "Let me think. "
    texts = 0
    for chunk in chunks:
        if cut is not None and cut["cut"] is not None and texts == int(cut["n"]):
            return await _cut_stream(request, response, cut["cut"])
        if cut is not None and cut["cut"] is None and chunk.get("usage") and not chunk["choices"]:
            _close(request)  # lostend: everything but the count and [DONE]
            return response
        texts += sum(1 for c in chunk["choices"] if c["text"])
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if cut is not None and cut["cut"] is None:
        _close(request)
        return response
    await response.write(b"data: [DONE]\n\n")
    return response


def _in_pairs(chunks: list[dict[str, Any]], prompt_tokens: int) -> list[dict[str, Any]]:
    """Two text chunks a chunk, each with the usage so far (one choice)."""
    out: list[dict[str, Any]] = []
    tokens = 0
    for chunk in chunks:
        choices = chunk["choices"]
        if choices and choices[0]["text"] and out and out[-1]["choices"]:
            last = out[-1]["choices"][0]
            if last["finish_reason"] is None and last.get("_n", 1) == 1:
                last["text"] += choices[0]["text"]
                last["_n"] = 2
                tokens += 1
                out[-1]["usage"] = _usage(prompt_tokens, tokens)
                continue
        if choices and choices[0]["text"]:
            tokens += 1
            chunk = {**chunk, "usage": _usage(prompt_tokens, tokens)}
        out.append(chunk)
    for chunk in out:
        for choice in chunk["choices"]:
            choice.pop("_n", None)
    return out


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _cut_stream(
    request: web.Request, response: web.StreamResponse, how: str
) -> web.StreamResponse:
    if how == "reset":
        _close(request)
    elif how == "hang":
        await _wait_for_close(request, limit=3600)
    elif how == "error":
        await response.write(b'data: {"error": {"message": "fake mid-stream failure"}}\n\n')
    elif how == "nofinish":
        await response.write(b"data: [DONE]\n\n")
    return response  # truncated: the end of the body, without [DONE]


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "requests": stats["requests"],
            "hits": dict(stats["hits"]),
            "connections": len(stats["peers"]),
            "client_gone": stats["client_gone"],
            "closed_at": stats["closed_at"],
            "last_body": stats["last_body"],
            "last_headers": stats["last_headers"],
            "redirected": stats["redirected"],
            "tokenizer_bodies": stats["tokenizer_bodies"],
        }
    )


_START = 256  # the fake tokenizer's document-start token


def _spell(token: int) -> str:
    """A token's text: a byte, the document start, or (any other id) `?`."""
    if token == _START:
        return "<s>"
    return bytes([token]).decode("latin-1") if token < _START else "?"


async def _tokenizer_request(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
    body = await request.json() if request.method == "POST" else dict(request.query)
    stats["tokenizer_bodies"].append({"path": request.path, **body})
    fault = request.headers.get("X-Fault") or str(body.get("model", ""))
    if fault.startswith("status-"):
        status = int(fault.split("-")[1])
        return body, web.json_response({"error": {"message": f"fault {status}"}}, status=status)
    if fault == "nested":
        deep = '{"tokens":' + "[" * 100_000 + "]" * 100_000 + "}"
        return body, web.Response(text=deep, content_type="application/json")
    if fault == "bad-ids":
        return body, web.json_response({"count": 1, "max_model_len": -1, "tokens": [-5]})
    return body, None


async def vllm_tokenize(request: web.Request) -> web.Response:
    body, refusal = await _tokenizer_request(request)
    if refusal is not None:
        return refusal
    tokens = ([_START] if body.get("add_special_tokens", True) else []) + list(body["prompt"].encode())
    answer: dict[str, Any] = {"count": len(tokens), "max_model_len": 4096, "tokens": tokens}
    answer["token_strs"] = [_spell(t) for t in tokens] if body.get("return_token_strs") else None
    return web.json_response(answer)


async def vllm_detokenize(request: web.Request) -> web.Response:
    body, refusal = await _tokenizer_request(request)
    if refusal is not None:
        return refusal
    return web.json_response({"prompt": "".join(_spell(t) for t in body["tokens"])})


async def vllm_tokenizer_info(request: web.Request) -> web.Response:
    _, refusal = await _tokenizer_request(request)
    if refusal is not None:
        return refusal
    info = {"tokenizer_class": "FakeTokenizer", "bos_token": "<s>", "eos_token": "<s>"}
    return web.json_response({**info, "model_max_length": 4096})


async def llamacpp_tokenize(request: web.Request) -> web.Response:
    body, refusal = await _tokenizer_request(request)
    if refusal is not None:
        return refusal
    tokens = ([_START] if body.get("add_special") else []) + list(body["content"].encode())
    if body.get("with_pieces"):
        return web.json_response({"tokens": [{"id": t, "piece": _spell(t)} for t in tokens]})
    return web.json_response({"tokens": tokens})


async def llamacpp_detokenize(request: web.Request) -> web.Response:
    body, refusal = await _tokenizer_request(request)
    if refusal is not None:
        return refusal
    return web.json_response({"content": "".join(_spell(t) for t in body["tokens"])})


async def post_reset(request: web.Request) -> web.Response:
    reset()
    lm.reset()
    return web.json_response({})


async def post_control(request: web.Request) -> web.Response:
    control.update(await request.json())
    return web.json_response(control)


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/elsewhere/v1/completions", elsewhere)
    app.router.add_post("/tokenize", vllm_tokenize)
    app.router.add_post("/detokenize", vllm_detokenize)
    app.router.add_get("/tokenizer_info", vllm_tokenizer_info)
    app.router.add_post("/llamacpp/tokenize", llamacpp_tokenize)
    app.router.add_post("/llamacpp/detokenize", llamacpp_detokenize)
    app.router.add_get("/_stats", get_stats)
    app.router.add_post("/_reset", post_reset)
    app.router.add_post("/_control", post_control)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
