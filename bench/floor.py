"""llmrouter beside the floor: the whole product against a bare Python hop on the same stack.

    .venv/bin/python bench/floor.py [REV ...] [--rounds 3] [--seconds 5] [--pg-redis URL,URL]
        [--litellm /path/to/venv/bin/litellm]

`../shared/bench/floor_router.py` is the least any router on uvicorn + httptools + uvloop +
msgspec + pooled aiohttp must do per request (a bearer key against a SHA-256 set, a typed decode,
one pooled upstream call, a re-encode). This script serves it, llmrouter (one worker, accounts on
with the SQLite default and its durability, access log off), and with `--pg-redis` a second
llmrouter with the ledger and keys in PostgreSQL and limits in Redis for a key with (unreached)
limits, all at once against one mock upstream, and measures them in turns, round by round, so the
machine's changes of speed fall on each alike. Each REV (a git revision, exported with
`git archive`; default: the working tree) is one more llmrouter beside the others. With
`--litellm`, LiteLLM's proxy (installed in a venv of its own: `python -m venv /tmp/litellm-venv &&
/tmp/litellm-venv/bin/pip install 'litellm[proxy]'`) is measured beside them too, for scale.

Per round, for each server: req/s at c64; server CPU per request at c16; latency p50/p99 at c1
(wrk), with the mock asked directly at c1 just before, so "added" = server − direct. For
each llmrouter also: streaming time to first token, sequential (a raw-socket client in its own
process, as bench/run.py), beside the mock's; and the CPU per request of a 100-chunk stream at c16.

The ratios the project holds itself to (issue 16) are printed with the goals: c64 req/s ≥ 75 %
of the floor's (55 % with PostgreSQL + Redis), CPU per request ≤ 1.4× the floor's, c1 added p50
≤ 2× and p99 ≤ 3× the floor's (4× with PostgreSQL + Redis), streamed TTFT added ≤ 1.5× the
router's own c1 added p50, a 100-chunk stream ≤ 2× the CPU of a request. Written to
bench/results/floor.md (git-ignored) as well as printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab import export
from run import (
    BODY,
    HOST,
    RESULTS,
    ROOT,
    _die_with_parent,
    _plain_once,
    drop_schema,
    free_port,
    mock_upstream,
    run_ttft,
    serve_keyed,
    stop,
    wrk,
)

FLOOR = ROOT.parent / "shared" / "bench" / "floor_router.py"
PATH = "/api/v1/completions"
DIRECT = "/v1/completions"
LONG_STREAM_BODY = '{"model":"mock/long","prompt":"Say hello","max_tokens":128,"stream":true}'

CONFIG = """\
default_model: mock/model
server: {{access_log: false}}
{accounts}providers:
  mock: {{kind: openai, base_url: "http://127.0.0.1:{mock_port}/v1"}}
models:
  - id: mock/model
    deployments: [{{provider: mock, model: mock-model}}]
  - id: mock/long
    deployments: [{{provider: mock, model: mock-model-100}}]
"""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    router: bool  # llmrouter (streams measured too), not the floor
    pg: bool = False
    path: str = PATH
    goals: bool = True  # issue 16's goals are llmrouter's (LiteLLM is shown beside, for scale)
    figures: list[dict[str, float]] = field(default_factory=list)  # one dict per round


def start_floor(port: int, mock_port: int, key: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(FLOOR), str(port), f"http://127.0.0.1:{mock_port}/v1", key],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=_die_with_parent,
        )  # fmt: skip
    return proc


def start_llmrouter(
    name: str, src: Path, tmp: Path, mock_port: int, accounts: str, limited: bool
) -> tuple[subprocess.Popen[bytes], int, str]:
    home, config = tmp / f"home-{name}", tmp / f"config-{name}.yaml"
    config.write_text(CONFIG.format(accounts=accounts, mock_port=mock_port))
    env = {**os.environ, "PYTHONPATH": str(src), "LLMROUTER_HOME": str(home)}
    return serve_keyed(config, env, tmp / f"router-{name}.log", "bench", limited=limited)


def cpu_ms_per_request(result: Any, name: str) -> float:
    return float(result.cpu[name] / 100 * result.seconds / max(result.requests, 1) * 1000)


def one_round(servers: list[Server], mock: Server, seconds: float, ttft_n: int) -> None:
    def load(s: Server, c: int, body: str = BODY) -> Any:
        r = wrk(s.port, s.path, c, seconds, s.key, 1, {s.name: s.proc.pid}, body=body)
        if r.errors:
            sys.exit(f"{s.name}: {r.errors} errors at c{c}")
        return r

    ttft_args = argparse.Namespace(ttft_requests=ttft_n, ttft_warmup=50)
    ttft_direct = run_ttft(mock.port, DIRECT, "", ttft_args)
    for s in servers:
        c64, c16 = load(s, 64), load(s, 16)
        # The direct tail moves from one load to the next (it is the machine's): each server's c1
        # is paired with a direct c1 just before it.
        direct = wrk(mock.port, DIRECT, 1, seconds, "", 1, {"mock": mock.proc.pid})
        c1 = load(s, 1)
        f = {
            "rps_c64": c64.rps,
            "cpu_ms": cpu_ms_per_request(c16, s.name),
            "p50_ms": c1.p50_ms,
            "p99_ms": c1.p99_ms,
            "added_p50_ms": c1.p50_ms - direct.p50_ms,
            "added_p99_ms": c1.p99_ms - direct.p99_ms,
        }
        if s.router:
            long = load(s, 16, LONG_STREAM_BODY)
            f["stream100_cpu_ms"] = cpu_ms_per_request(long, s.name)
            ttft = run_ttft(s.port, PATH, s.key, ttft_args)
            f["ttft_added_p50_ms"] = ttft["ttft_p50_ms"] - ttft_direct["ttft_p50_ms"]
        s.figures.append(f)
        print(
            f"  {s.name:<14} c64 {f['rps_c64']:>7,.0f} req/s  cpu {f['cpu_ms']:.3f} ms  "
            f"c1 +{f['added_p50_ms']:.3f} / +{f['added_p99_ms']:.3f} ms", flush=True,
        )  # fmt: skip


# Ratios of throughput and CPU are taken round by round (the machine's drift falls on both
# alike), then their median; ratios of added latency are of the medians over rounds, since one
# round's added tail can be near zero (the direct tail is as noisy as the floor's).
PER_ROUND: dict[str, Callable[[dict[str, float], dict[str, float]], float]] = {
    "rps_c64": lambda a, b: a["rps_c64"] / b["rps_c64"],
    "cpu": lambda a, b: a["cpu_ms"] / b["cpu_ms"],
    "ttft": lambda a, b: a["ttft_added_p50_ms"] / a["added_p50_ms"],
    "stream100": lambda a, b: a["stream100_cpu_ms"] / a["cpu_ms"],
}
OF_MEDIANS = {"added_p50": "added_p50_ms", "added_p99": "added_p99_ms"}


def ratios(s: Server, floor: Server) -> dict[str, tuple[float, list[float]]]:
    """Each ratio: (the figure, what each round gave)."""
    med = statistics.median
    rounds = list(zip(s.figures, floor.figures, strict=True))
    out: dict[str, tuple[float, list[float]]] = {}
    for name, fn in PER_ROUND.items():
        if name in ("ttft", "stream100") and not s.router:
            continue
        each = [fn(a, b) for a, b in rounds]
        out[name] = (med(each), each)
    for name, key in OF_MEDIANS.items():
        each = [a[key] / b[key] for a, b in rounds]
        out[name] = (med(a[key] for a, _ in rounds) / med(b[key] for _, b in rounds), each)
    return dict(sorted(out.items(), key=lambda kv: list(GOALS).index(kv[0])))


GOALS = {  # name: (label, goal on SQLite, goal on PostgreSQL + Redis (None: none), at least)
    "rps_c64": ("c64 req/s ÷ floor's", 0.75, 0.55, True),
    "cpu": ("CPU per request ÷ floor's", 1.4, None, False),
    "added_p50": ("c1 added p50 ÷ floor's", 2.0, None, False),
    "added_p99": ("c1 added p99 ÷ floor's", 3.0, 4.0, False),
    "ttft": ("TTFT added ÷ own c1 added p50", 1.5, 1.5, False),
    "stream100": ("100-chunk stream CPU ÷ request's", 2.0, 2.0, False),
}


def render(servers: list[Server], floor: Server, args: argparse.Namespace, when: str) -> str:
    med = statistics.median
    lines = [
        f"### {when}: llmrouter beside the floor ({args.rounds} rounds of {args.seconds:g} s a load)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        "Medians over rounds. Ratios of req/s and CPU are taken round by round, then their "
        "median; ratios of added latency are of the medians.",
        "",
        "| server | req/s c64 | CPU ms/request c16 | c1 p50 ms (added) | c1 p99 ms (added) "
        "| TTFT added p50 ms | 100-chunk stream CPU ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in [floor, *servers]:

        def m(k: str, s: Server = s) -> float:
            return med(f[k] for f in s.figures)

        stream = f"{m('ttft_added_p50_ms'):.3f} | {m('stream100_cpu_ms'):.3f}" if s.router else "- | -"
        lines.append(
            f"| {s.name} | {m('rps_c64'):,.0f} | {m('cpu_ms'):.3f} | {m('p50_ms'):.3f} "
            f"(+{m('added_p50_ms'):.3f}) | {m('p99_ms'):.3f} (+{m('added_p99_ms'):.3f}) | {stream} |"
        )
    lines += ["", "| server | ratio | goal | median | each round |", "|---|---|---|---:|---|"]
    for s in servers:
        for k, (value, rounds) in ratios(s, floor).items():
            label, on_sqlite, on_pg, at_least = GOALS[k]
            goal = (on_pg if s.pg else on_sqlite) if s.goals else None
            if goal is None:
                verdict = "-"
            else:
                ok = value >= goal if at_least else value <= goal
                verdict = f"{'≥' if at_least else '≤'} {goal:g} " + ("met" if ok else "**missed**")
            each = ", ".join(f"{x:.2f}" for x in rounds)
            lines.append(f"| {s.name} | {label} | {verdict} | {value:.2f} | {each} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revs", nargs="*", help="git revisions to serve (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load")
    parser.add_argument("--ttft-requests", type=int, default=1000)
    parser.add_argument(
        "--pg-redis",
        metavar="DATABASE_URL,REDIS_URL",
        help="also llmrouter on PostgreSQL + Redis with a limited key (a throw-away schema)",
    )
    parser.add_argument(
        "--litellm",
        metavar="LITELLM",
        type=Path,
        help="also LiteLLM's proxy (the `litellm` command of a venv of its own) on the same mock",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "floor.md")
    args = parser.parse_args()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tmp = Path(tempfile.mkdtemp(prefix="llmrouter-floor-"))
    mock_port = free_port()
    variants: list[tuple[str, Path, str, bool]] = []  # name, src, accounts yaml, pg
    for i, rev in enumerate(args.revs or ["worktree"]):
        src = ROOT / "src" if rev == "worktree" else export(rev, tmp / f"rev-{i}")
        variants.append((rev, src, "", False))
        if args.pg_redis:
            database_url, redis_url = args.pg_redis.split(",")
            schema = f"bench_floor_{os.getpid()}_{i}"
            accounts = (
                f"accounts:\n  database_url: {database_url}\n  database_schema: {schema}\n"
                f"  redis_url: {redis_url}\n"
            )
            variants.append((f"{rev} pg+redis", src, accounts, True))
    per_round = (len(variants) * 5 + 10) * (args.seconds + 1) + 2 * args.ttft_requests * 0.005
    budget = 120 + (args.rounds + 1) * per_round
    servers: list[Server] = []
    with mock_upstream(mock_port, budget, tmp / "mock.log") as mock_proc:
        try:
            for i, (name, src, accounts, pg) in enumerate(variants):
                proc, port, key = start_llmrouter(f"{i}", src, tmp, mock_port, accounts, limited=pg)
                servers.append(Server(name, proc, port, key, router=True, pg=pg))
            floor_port = free_port()
            floor_key = servers[0].key
            floor_proc = start_floor(floor_port, mock_port, floor_key, tmp / "floor.log")
            floor = Server("floor", floor_proc, floor_port, floor_key, router=False)
            wait_healthy_post(floor)
            if args.litellm:
                servers.append(start_litellm(args.litellm, tmp, mock_port))
            mock = Server("mock", mock_proc, mock_port, "", router=False)
            print("warm-up round (not counted)", flush=True)
            one_round([floor, *servers], mock, 2.0, 200)
            for s in (floor, *servers):
                s.figures.clear()
            for n in range(args.rounds):
                print(f"round {n + 1} of {args.rounds}", flush=True)
                one_round([floor, *servers], mock, args.seconds, args.ttft_requests)
        finally:
            for s in servers:
                stop(s.proc)
            if "floor_proc" in locals():
                stop(floor_proc)
    report = render(servers, floor, args, when)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    if args.pg_redis:
        for i in range(len(args.revs or ["worktree"])):
            drop_schema(args.pg_redis.split(",")[0], f"bench_floor_{os.getpid()}_{i}")


LITELLM_CONFIG = """\
model_list:
  - model_name: mock/model
    litellm_params:
      model: text-completion-openai/mock-model
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: unused
"""


def start_litellm(command: Path, tmp: Path, mock_port: int) -> Server:
    """LiteLLM's proxy, one worker, its master key as the bearer key (no database: no virtual
    keys, no spend log), on the same mock, its /v1/completions (the text-completion route)."""
    config = tmp / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(mock_port=mock_port))
    key = "sk-" + os.urandom(24).hex()
    port = free_port()
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR"}
    with open(tmp / "litellm.log", "wb") as out:
        proc = subprocess.Popen(
            [str(command), "--config", str(config), "--port", str(port), "--num_workers", "1"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=_die_with_parent,
        )  # fmt: skip
    litellm = Server("LiteLLM", proc, port, key, router=False, path=DIRECT, goals=False)
    wait_healthy_post(litellm, deadline_s=120)
    return litellm


def wait_healthy_post(floor: Server, deadline_s: float = 20.0) -> None:
    """The floor has no /health: wait until a completion goes through it."""
    body = BODY.encode()
    request = (
        f"POST {floor.path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {floor.key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection((HOST, floor.port), timeout=5) as sock:
                if b"Hello" in _plain_once(sock, request):
                    return
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > end or floor.proc.poll() is not None:
            sys.exit("the floor router did not come up; see its log")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
