"""What a stream costs the router's process beside a plain request, in process: the ASGI app
(accounts on, SQLite, access log off) driven by 16 concurrent callers, its one provider the
mock upstream (`bench/mock_upstream.py`, a process of its own, on loopback). The edge (uvicorn's
protocol) and wrk are left out, so what differs between the three is the stream's own path.

    .venv/bin/python bench/stream_cost.py [--requests 3000] [--rounds 5]
    .venv/bin/python bench/stream_cost.py --src /path/to/rev-a/src --src /path/to/rev-b/src

Per round: a non-streamed request, a 5-chunk stream and a 100-chunk stream, each `--requests`
times after a warm-up; the figure is this process's CPU time (user + system, its writer thread
too) per request. With `--src`, each round runs each revision's `src` in a child process in
turn, and the table shows the median over rounds, and the 100-chunk stream's ratio to the
request (issue 16's goal is at most 2 with the edge in; see bench/floor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import free_port, mock_upstream

KINDS = {
    "request": b'{"model":"mock/model","prompt":"Say hello","max_tokens":16}',
    "stream5": b'{"model":"mock/model","prompt":"Say hello","max_tokens":16,"stream":true}',
    "stream100": b'{"model":"mock/long","prompt":"Say hello","max_tokens":128,"stream":true}',
}


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _unchunked(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return bytes(out)
        out += rest[:n]
        body = rest[n + 2 :]


async def measure(port: int, home: str, requests: int, in_process: bool) -> dict[str, float]:
    from llmrouter.app import create_app
    from llmrouter.settings import (
        DeploymentSettings,
        ModelSettings,
        OpenAIProvider,
        ServerSettings,
        Settings,
    )

    settings = Settings(
        default_model="mock/model",
        providers={"mock": OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1")},
        models=[
            ModelSettings(
                id="mock/model", deployments=[DeploymentSettings(provider="mock", model="mock-model")]
            ),
            ModelSettings(
                id="mock/long", deployments=[DeploymentSettings(provider="mock", model="mock-model-100")]
            ),
        ],
        server=ServerSettings(access_log=False),
        home=home,
    )
    app = create_app(settings)
    if in_process:
        from llmrouter.providers import _http
        from mock_upstream import _build

        bodies = {}  # the mock's answers' bodies (a stream's events unframed, as the client gives)
        for name, raw in _build().items():
            head, _, body = raw.partition(b"\r\n\r\n")
            bodies[name] = _unchunked(body) if b"chunked" in head else body

        async def answer(request: _http.Request) -> _http.MockResponse:
            asked = request.body or b""
            name = "stream100" if b"mock-model-100" in asked else "stream"
            body = bodies[name if b'"stream":true' in asked else "completion"]
            return _http.MockResponse(200, body, {"content-type": "application/json"})

        for provider in app.ctx.catalog.providers.values():
            provider.transport = _http.MockTransport(answer, name="mock")  # type: ignore[attr-defined]
    await app.ctx.start()
    try:
        _, secret = await app.ctx.keys.create("bench")
        headers = [
            (b"authorization", f"Bearer {secret}".encode()),
            (b"content-type", b"application/json"),
        ]

        async def one(body: bytes) -> None:
            sent: list[dict[str, Any]] = []
            given = False

            async def receive() -> dict[str, Any]:
                nonlocal given
                if not given:
                    given = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/completions",
                "query_string": b"",
                "headers": headers,
            }
            await app(scope, receive, send)
            assert sent[0]["status"] == 200, sent

        async def worker(body: bytes, count: int) -> None:
            for _ in range(count):
                await one(body)

        out: dict[str, float] = {}
        for kind, body in KINDS.items():
            await asyncio.gather(*(worker(body, 20) for _ in range(16)))  # warm-up
            c0 = cpu()
            await asyncio.gather(*(worker(body, requests // 16) for _ in range(16)))
            out[kind] = (cpu() - c0) / (requests // 16 * 16) * 1000
        return out
    finally:
        await app.ctx.aclose()


def child(port: int, requests: int, in_process: bool) -> None:
    import uvloop

    with tempfile.TemporaryDirectory() as home:
        figures = uvloop.run(measure(port, home, requests, in_process))
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", action="append", default=[], help="a revision's src (repeatable)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="the mock's answers from a MockTransport, no network: steadier, for A/B of the path",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests, args.in_process)
        return
    srcs = args.src or [str(Path(__file__).resolve().parent.parent / "src")]
    port = free_port()
    results: dict[str, list[dict[str, float]]] = {src: [] for src in srcs}
    with tempfile.TemporaryDirectory() as tmp:
        budget = args.rounds * len(srcs) * 120
        with mock_upstream(port, budget, Path(tmp) / "mock.log"):
            for _ in range(args.rounds):
                for src in srcs:
                    env = dict(os.environ, PYTHONPATH=src)
                    command = [
                        sys.executable,
                        __file__,
                        "--child",
                        str(port),
                        "--requests",
                        str(args.requests),
                    ]
                    command += ["--in-process"] if args.in_process else []
                    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                    results[src].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"CPU ms per request, median of {args.rounds} rounds of {args.requests} each (16 at once)\n")
    print("| src | request | 5-chunk stream | 100-chunk stream | 100-chunk ÷ request |")
    print("|---|---:|---:|---:|---:|")
    for src, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in KINDS}
        ratio = statistics.median(r["stream100"] / r["request"] for r in rounds)
        cells = " | ".join(f"{med[k]:.3f}" for k in KINDS)
        print(f"| {src} | {cells} | {ratio:.2f} |")
    print("\nEach round (request / 5-chunk / 100-chunk):")
    for src, rounds in results.items():
        print(
            src, ", ".join(f"{r['request']:.3f}/{r['stream5']:.3f}/{r['stream100']:.3f}" for r in rounds)
        )


if __name__ == "__main__":
    main()
