"""What the chat endpoint costs beside /completions: the same deployment asked the same thing
through `POST /chat/completions` (a message) and through `POST /completions` (a prompt), in turns,
with the mock itself asked directly as the reference.

    .venv/bin/python bench/chat.py [--rounds 3] [--seconds 4] [--connections 1,64]

One mock (bench/mock_upstream.py) speaks every wire format; one router serves a model of each kind
on it (the `openai` kind through a chat template, as the embedded model is). Each round measures,
for each kind: wrk at the mock in the kind's own format, at the router's /completions, at its
/chat/completions. "Chat - completions" is the difference of the medians, per percentile.
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

from kinds import DIRECT, PROMPT, Results, measure
from run import free_port, mock_upstream, serve_keyed, stop

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>\\n{% endfor %}"
    "<|im_start|>assistant\\n"
)
CONFIG = """\
default_model: mock/openai
server: {{access_log: false}}
providers:
  openai: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1"}}
  openai_chat: {{kind: openai_chat, base_url: "http://127.0.0.1:{port}/v1", api_key: k}}
  anthropic: {{kind: anthropic, base_url: "http://127.0.0.1:{port}", api_key: k}}
  gemini: {{kind: gemini, base_url: "http://127.0.0.1:{port}", api_key: k}}
models:
  - id: mock/openai
    deployments: [{{provider: openai, model: mock-model, chat_template: "{template}"}}]
  - {{id: mock/openai_chat, deployments: [{{provider: openai_chat, model: mock-model}}]}}
  - {{id: mock/anthropic, deployments: [{{provider: anthropic, model: mock-model}}]}}
  - {{id: mock/gemini, deployments: [{{provider: gemini, model: mock-model}}]}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", default="1,64")
    args = parser.parse_args()
    loads = [int(c) for c in args.connections.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="llmrouter-chat-"))
    port = free_port()
    budget = 60 + args.rounds * len(DIRECT) * len(loads) * 3 * (args.seconds + 1)
    results: Results = {}
    with mock_upstream(port, budget, tmp / "mock.log"):
        config = tmp / "config.yaml"
        config.write_text(CONFIG.format(port=port, template=TEMPLATE))
        env = {**os.environ, "LLMROUTER_HOME": str(tmp / "home")}
        proc, router_port, key = serve_keyed(config, env, tmp / "router.log", "chat")
        try:
            for _ in range(args.rounds):
                for kind, (path, body) in DIRECT.items():
                    model = f"mock/{kind}"
                    prompt = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 16})
                    message = json.dumps(
                        {
                            "model": model,
                            "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": 16,
                        }
                    )
                    sides = {
                        "direct": (port, path, json.dumps(body), ""),
                        "completions": (router_port, "/api/v1/completions", prompt, key),
                        "chat": (router_port, "/api/v1/chat/completions", message, key),
                    }
                    measure(kind, sides, loads, args.seconds, results)
        finally:
            stop(proc)
    med = statistics.median
    print(
        "| kind | load | direct req/s | /completions req/s | /chat/completions req/s | chat / "
        "completions req/s | chat - completions p50 ms | chat - completions p99 ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in DIRECT:
        for c in loads:
            d, o, n = (results[(kind, side, c)] for side in ("direct", "completions", "chat"))
            print(
                f"| {kind} | c{c} | {med(x[0] for x in d):,.0f} | {med(x[0] for x in o):,.0f} | "
                f"{med(x[0] for x in n):,.0f} | {med(x[0] for x in n) / med(x[0] for x in o):.0%} | "
                f"{med(x[1] for x in n) - med(x[1] for x in o):+.3f} | "
                f"{med(x[2] for x in n) - med(x[2] for x in o):+.3f} |"
            )


if __name__ == "__main__":
    main()
