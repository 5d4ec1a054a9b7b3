"""What each kind of upstream adds: direct to the mock in the kind's own wire format, beside the
same text through llmrouter's /completions to a deployment of that kind, in turns.

    .venv/bin/python bench/kinds.py [--rounds 3] [--seconds 4] [--connections 1,64]

One mock (bench/mock_upstream.py) speaks every wire format; one router serves a model of each kind
on it. Each round measures, for each kind, wrk straight at the mock's endpoint with that kind's
request body, then wrk at the router asking that kind's model, so that the machine's changes of
speed fall on every kind alike. "Added" is router minus direct, for the same percentile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import free_port, mock_upstream, serve_keyed, stop, wrk

CONFIG = """\
default_model: mock/openai
server: {{access_log: false}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1"}}
  openai_chat: {{kind: openai_chat, base_url: "http://127.0.0.1:{port}/v1", api_key: k}}
  anthropic: {{kind: anthropic, base_url: "http://127.0.0.1:{port}", api_key: k}}
  gemini: {{kind: gemini, base_url: "http://127.0.0.1:{port}", api_key: k}}
models:
  - {{id: mock/openai, deployments: [{{provider: openai, model: mock-model}}]}}
  - {{id: mock/openai_chat, deployments: [{{provider: openai_chat, model: mock-model}}]}}
  - {{id: mock/anthropic, deployments: [{{provider: anthropic, model: mock-model}}]}}
  - {{id: mock/gemini, deployments: [{{provider: gemini, model: mock-model}}]}}
"""
PROMPT = "Say hello"
# Each kind's own request for the same thing, as the router sends it, and where it goes.
DIRECT = {
    "openai": ("/v1/completions", {"model": "mock-model", "prompt": PROMPT, "max_tokens": 16}),
    "openai_chat": (
        "/v1/chat/completions",
        {"model": "mock-model", "messages": [{"role": "user", "content": PROMPT}],
         "max_completion_tokens": 16},
    ),
    "anthropic": (
        "/v1/messages",
        {"model": "mock-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16},
    ),
    "gemini": (
        "/v1beta/models/mock-model:generateContent",
        {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
         "generationConfig": {"maxOutputTokens": 16}},
    ),
}  # fmt: skip


Results = dict[tuple[str, str, int], list[tuple[float, float, float]]]


def measure(
    kind: str,
    sides: dict[str, tuple[int, str, str, str]],
    loads: list[int],
    seconds: float,
    results: Results,
) -> None:
    """One round of a kind: wrk at each side ((port, path, body, key) each) at each load, in
    turns, its (req/s, p50, p99) added to `results`; a side with errors ends the benchmark."""
    for c in loads:
        for side, (port, path, body, auth) in sides.items():
            r = wrk(port, path, c, seconds, auth, 1, body=body)
            if r.errors or not r.requests:
                sys.exit(f"{kind} {side} c{c}: {r.errors} errors, {r.requests} requests")
            results.setdefault((kind, side, c), []).append((r.rps, r.p50_ms, r.p99_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", default="1,64")
    args = parser.parse_args()
    loads = [int(c) for c in args.connections.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="llmrouter-kinds-"))
    port = free_port()
    budget = 60 + args.rounds * len(DIRECT) * len(loads) * 2 * (args.seconds + 1)
    results: Results = {}
    with mock_upstream(port, budget, tmp / "mock.log"):
        config = tmp / "config.yaml"
        config.write_text(CONFIG.format(port=port))
        env = {**os.environ, "LLMROUTER_HOME": str(tmp / "home")}
        proc, router_port, key = serve_keyed(config, env, tmp / "router.log", "kinds")
        try:
            for _ in range(args.rounds):
                for kind, (path, body) in DIRECT.items():
                    routed = json.dumps({"model": f"mock/{kind}", "prompt": PROMPT, "max_tokens": 16})
                    sides = {
                        "direct": (port, path, json.dumps(body), ""),
                        "router": (router_port, "/api/v1/completions", routed, key),
                    }
                    measure(kind, sides, loads, args.seconds, results)
        finally:
            stop(proc)
    med = statistics.median
    print("| kind | load | direct req/s | router req/s | added p50 ms | added p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in DIRECT:
        for c in loads:
            d, r = results[(kind, "direct", c)], results[(kind, "router", c)]
            print(
                f"| {kind} | c{c} | {med(x[0] for x in d):,.0f} | {med(x[0] for x in r):,.0f} | "
                f"{med(x[1] for x in r) - med(x[1] for x in d):+.3f} | "
                f"{med(x[2] for x in r) - med(x[2] for x in d):+.3f} |"
            )


if __name__ == "__main__":
    main()
