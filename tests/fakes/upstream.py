"""A fake OpenAI-compatible upstream: a real HTTP server on loopback whose model name picks a fault.

    python tests/fakes/upstream.py PORT

Models: `ok` (answers, echoing what it received), `status-NNN` (answers NNN; 429 carries
Retry-After: 7), `hang` (never answers), `malformed` (invalid JSON), `stream-truncated` (two chunks,
then the connection ends without [DONE]), `stream-error` (one chunk, then an in-band error event),
`slow-first` (waits 2 s before anything), `slow-stream` (one chunk every 0.2 s, 100 of them).
`GET /_stats` tells how many requests and distinct client connections it saw, and how many streams
ended because the client went away.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

stats: dict[str, Any] = {"requests": 0, "peers": set(), "client_gone": 0, "last_body": None}


def _completion(model: str, text: str, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _chunk(model: str, text: str, finish: str | None = None) -> bytes:
    body = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    stats["requests"] += 1
    peer = request.transport.get_extra_info("peername") if request.transport else None
    stats["peers"].add(str(peer))
    body = await request.json()
    stats["last_body"] = body
    stats["last_headers"] = dict(request.headers)
    model = body.get("model", "")
    if model.startswith("status-"):
        status = int(model.split("-", 1)[1])
        headers = {"Retry-After": "7"} if status == 429 else {}
        error = {"error": {"message": f"fake failure {status}", "type": "fake", "code": None}}
        return web.json_response(error, status=status, headers=headers)
    if model == "hang":
        await asyncio.sleep(3600)
    if model == "malformed":
        return web.Response(text="{not json", content_type="application/json")
    if model == "slow-first":
        await asyncio.sleep(2)
    if not body.get("stream"):
        return web.json_response(_completion(model, json.dumps(body, sort_keys=True)))

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        if model == "slow-stream":
            for i in range(100):
                await response.write(_chunk(model, f"t{i} "))
                await asyncio.sleep(0.2)
        elif model == "stream-truncated":
            await response.write(_chunk(model, "one "))
            await response.write(_chunk(model, "two "))
            request.transport.close()  # type: ignore[union-attr]
            return response
        elif model == "stream-error":
            await response.write(_chunk(model, "one "))
            await response.write(b'data: {"error": {"message": "fake mid-stream failure"}}\n\n')
            return response
        else:
            for word in ("Hello", " from", " fake"):
                await response.write(_chunk(model, word))
        await response.write(_chunk(model, "", "stop"))
        usage = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        stats["client_gone"] += 1
        raise
    return response


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "requests": stats["requests"],
            "connections": len(stats["peers"]),
            "client_gone": stats["client_gone"],
            "last_body": stats["last_body"],
            "last_headers": stats.get("last_headers"),
        }
    )


async def reset_stats(request: web.Request) -> web.Response:
    stats.update(requests=0, peers=set(), client_gone=0, last_body=None)
    return web.json_response({})


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/_stats", get_stats)
    app.router.add_post("/_reset", reset_stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
