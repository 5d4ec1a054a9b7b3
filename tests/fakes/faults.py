"""What the chat fakes (openai_chat.py, anthropic.py, gemini.py) share: the record of what they were
sent, the reading of a fault from the model name (or an `X-Fault` header, which wins), the faults
every provider suffers alike, and a stream played out with its cut.

Faults of every chat fake (streamed and not, unless said), each answering with its own error body:
  status-NNN          NNN with the provider's error body; 429 carries `Retry-After: 7`
  status-429-bare     429 without Retry-After
  retry-after-N       429 with `Retry-After: N`
  context-400         the provider's own 400 for a prompt longer than the context window
  hang                never answers (no headers)
  reset-before        closes the connection without answering
  slow-ok-MS          waits MS milliseconds, then answers as `ok`
  wait-close          holds the request until the client goes, and notes when (time.time())
  echo-NNN            NNN with the provider's error body, its message quoting the request line and
                      every request header, as a proxy in between might (credentials included)
An answering name (`ok`, `lm`, `lm-*`, or a provider's variant such as `think`) may end in a cut:
  ...-reset-after-N   stream: N events, then the connection closes; not streamed: half the body,
                      then the connection closes
  ...-hang-after-N    stream: N events, then silence (not streamed: as `hang`)
  ...-truncated       stream: every event but the terminal one, then the end of the body; not
                      streamed: as reset-after-N (a body cannot end early but by a close)
  ...-stream-error    stream: the events up to the first text, then the provider's in-band error
                      event; not streamed: a 200 whose body is the provider's error
  ...-malformed       not streamed: a 200 body that is not JSON; stream: the first event, then one
                      whose data is not JSON
  ...-slow-stream-MS  stream: one event every MS milliseconds
A cut alone (`truncated`, `reset-after-3`, ...) cuts `ok`.

`GET /_stats`: requests, hits per model, distinct client connections, streams whose client left,
close times noted by `wait-close`, the credential headers of each request (`credentials`, the
last 100), and the last request's path, query, body and headers. `POST /_reset` clears them.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

try:
    from tests.fakes import lm
except ImportError:  # run as a script: python tests/fakes/anthropic.py PORT
    import lm  # type: ignore[no-redef]

stats: dict[str, Any] = {}


def reset() -> None:
    stats.update(
        requests=0,
        hits=Counter(),
        peers=set(),
        client_gone=0,
        closed_at=[],
        credentials=[],
        last_path=None,
        last_query=None,
        last_body=None,
        last_headers=None,
    )
    lm.reset()


reset()


def record(request: web.Request, body: Any, model: str, credential_headers: Iterable[str]) -> str:
    """Notes the request in the stats; returns the fault it asks for."""
    stats["requests"] += 1
    peer = request.transport.get_extra_info("peername") if request.transport else None
    stats["peers"].add(str(peer))
    stats["hits"][model] += 1
    stats["last_path"] = request.path
    stats["last_query"] = dict(request.query)
    stats["last_body"] = body
    stats["last_headers"] = dict(request.headers)
    sent = {h.lower(): request.headers[h] for h in credential_headers if h in request.headers}
    stats["credentials"] = [*stats["credentials"][-99:], sent]
    return request.headers.get("X-Fault") or model


@dataclass(frozen=True)
class Fault:
    """An answering fault name read: what answers, the provider's variants, and the cut."""

    model: str  # "ok" or an lm variant
    flags: frozenset[str]
    cut: str | None = None  # reset, hang, truncated, stream-error, malformed, slow-stream
    n: int = 0  # the N of reset-after-N and hang-after-N, the MS of slow-stream-MS


_CUT = re.compile(
    r"(?:^|-)(?:(?P<cut>reset|hang)-after-(?P<n>\d+)|(?P<end>truncated|stream-error|malformed)"
    r"|slow-stream-(?P<ms>\d+))$"
)


def read(name: str, flags: Iterable[str]) -> Fault:
    """`lm-think-reset-after-3` with flags {think}: lm, {think}, reset after 3 events."""
    cut, n = None, 0
    match = _CUT.search(name)
    if match is not None:
        name = name[: match.start()]
        if match["cut"]:
            cut, n = match["cut"], int(match["n"])
        elif match["ms"]:
            cut, n = "slow-stream", int(match["ms"])
        else:
            cut = match["end"]
    found = set()
    for flag in sorted(flags, key=len, reverse=True):
        pattern = rf"(?:^|-){re.escape(flag)}(?=-|$)"
        if re.search(pattern, name):
            found.add(flag)
            name = re.sub(pattern, "", name)
    name = name.strip("-")
    model = name if name == "lm" or name.startswith("lm-") else "ok"
    return Fault(model, frozenset(found), cut, n)


@dataclass(frozen=True)
class Wire:
    """What the shared faults need of one provider's wire format."""

    error: Callable[[int, str, dict[str, str]], web.Response]  # status, message, headers
    context_error: Callable[[], web.Response]
    stream_error: bytes  # the in-band error event, framed
    malformed_event: bytes  # an event whose data is not JSON, framed
    error_body: bytes  # a whole body that is the provider's error (stream-error not streamed)


async def early(request: web.Request, fault: str, wire: Wire) -> web.StreamResponse | None:
    """The answer to a fault that answers no text, or None to go on to the answer."""
    if fault.startswith("echo-"):
        seen = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
        return wire.error(int(fault[5:]), f"proxy saw {request.method} {request.path_qs} {seen}", {})
    if fault.startswith("retry-after-"):
        return wire.error(429, "fake rate limit", {"Retry-After": fault.removeprefix("retry-after-")})
    if fault.startswith("status-"):
        code = int(fault.split("-")[1])
        headers = {"Retry-After": "7"} if code == 429 and fault != "status-429-bare" else {}
        return wire.error(code, f"fake failure {code}", headers)
    if fault == "context-400":
        return wire.context_error()
    if fault == "hang":
        await asyncio.sleep(3600)
    if fault == "reset-before":
        close(request)
        return web.Response()
    if fault == "wait-close":
        await wait_for_close(request)
        return web.Response()
    if fault.startswith("slow-ok-"):
        await asyncio.sleep(int(fault.removeprefix("slow-ok-")) / 1000)
    return None


def close(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def wait_for_close(
    request: web.Request, limit: float = 30.0, noted: list[float] | None = None
) -> None:
    """Until the client closes the connection (at most `limit` s); when, noted in `noted` (by
    default this module's stats)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            (stats["closed_at"] if noted is None else noted).append(time.time())
            return
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Event:
    data: bytes  # framed, as sent
    text: bool = False  # it carries answer text (where stream-error cuts)


async def whole(
    request: web.Request,
    body: bytes,
    fault: Fault,
    wire: Wire,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """A complete JSON answer, cut as `fault` says."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    if fault.cut == "hang":
        await asyncio.sleep(3600)
    if fault.cut == "malformed":
        body = b'{"not json'
    if fault.cut == "stream-error":
        body = wire.error_body
    if fault.cut not in ("reset", "truncated"):
        return web.Response(body=body, headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    close(request)
    return response


async def play(
    request: web.Request,
    events: list[Event],
    fault: Fault,
    wire: Wire,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """A stream of `events` (its terminal event last), cut as `fault` says."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})}
    )
    await response.prepare(request)
    try:
        for i, event in enumerate(events):
            if fault.cut in ("reset", "hang") and i == fault.n:
                if fault.cut == "hang":
                    await wait_for_close(request, limit=3600)
                close(request)
                return response
            if fault.cut == "truncated" and i == len(events) - 1:
                return response
            if fault.cut == "malformed" and i == 1:
                await response.write(wire.malformed_event)
                return response
            if fault.cut == "slow-stream" and i:
                await asyncio.sleep(fault.n / 1000)
            await response.write(event.data)
            if fault.cut == "stream-error" and event.text:
                await response.write(wire.stream_error)
                return response
    except (ConnectionResetError, asyncio.CancelledError):
        stats["client_gone"] += 1
        raise
    return response


def sse(data: Any, event: str | None = None, *, end: bytes = b"\n\n", **dumps: Any) -> bytes:
    """One server-sent event: `event: NAME` if named, one `data:` line, then the blank line."""
    head = f"event: {event}\n".encode() if event else b""
    text = data if isinstance(data, str) else json.dumps(data, **dumps)
    return head + b"data: " + text.encode() + end


async def get_stats(request: web.Request) -> web.Response:
    shown = {k: v for k, v in stats.items() if k != "peers"}
    shown["hits"] = dict(stats["hits"])
    shown["connections"] = len(stats["peers"])
    return web.json_response(shown)


async def post_reset(request: web.Request) -> web.Response:
    reset()
    return web.json_response({})


def serve(routes: list[web.RouteDef]) -> None:
    """Runs the fake on 127.0.0.1, the port the first argument: `python FAKE.py PORT`."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([*routes, web.get("/_stats", get_stats), web.post("/_reset", post_reset)])
    port = int(sys.argv[1])
    # A stopped fake stops at once, its hung answers (hang, wait-close) with it.
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, shutdown_timeout=0.2)
