"""Revisions of llmrouter side by side: each served at once against one mock, measured in turns.

    .venv/bin/python bench/ab.py 52be946 HEAD [--rounds 4] [--seconds 4] [--connections 64,1]
    .venv/bin/python bench/ab.py HEAD "HEAD+metrics: {enabled: false}"   # one revision, two configs
    .venv/bin/python bench/ab.py HEAD~1 HEAD --body stream100 --connections 16  # long streams
    .venv/bin/python bench/ab.py HEAD~1 HEAD --pg-redis postgresql://postgres@127.0.0.1:5432/test,redis://127.0.0.1:6379/0

Each revision is exported with `git archive` into a temporary folder and served by this venv's
interpreter with that folder first on `PYTHONPATH` (so dependencies are today's; only the code
differs). All routers run at the same time, idle but for the one being measured, and the loads
alternate between them round by round: a change in the machine's speed (this VM's is large) then
falls on every revision alike, which separate runs of bench/run.py cannot promise. A revision
written `REV+YAML` is served with YAML's top-level keys added to the config (a setting on or off;
a `server:` there replaces the default `server: {access_log: false}`). With `--pg-redis`, each
revision keeps its keys and ledger in a throw-away PostgreSQL schema of its own (dropped at the
end) and its limits in Redis, and is measured with a limited key (limits it never reaches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ROOT, drop_schema, free_port, mock_upstream, serve_keyed, stop, wrk

CONFIG = """\
default_model: mock/model
server: {{access_log: false}}
providers:
  mock: {{kind: openai, base_url: "http://127.0.0.1:{mock_port}/v1"}}
models:
  - id: mock/model
    deployments: [{{provider: mock, model: mock-model}}]
  - id: mock/long
    deployments: [{{provider: mock, model: mock-model-100}}]
"""
BODIES = {
    "plain": '{"model":"mock/model","prompt":"Say hello","max_tokens":16}',
    "stream": '{"model":"mock/model","prompt":"Say hello","max_tokens":16,"stream":true}',
    "stream100": '{"model":"mock/long","prompt":"Say hello","max_tokens":128,"stream":true}',
}


def export(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def schema(i: int) -> str:
    return f"bench_ab_{os.getpid()}_{i}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revs", nargs="+", help="git revisions (commits, branches, HEAD)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="per load")
    parser.add_argument("--connections", default="64,1", help="wrk -c values, comma-separated")
    parser.add_argument(
        "--body", choices=sorted(BODIES), default="plain", help="stream: 5 chunks; stream100: 100"
    )
    parser.add_argument(
        "--pg-redis", metavar="DATABASE_URL,REDIS_URL", help="accounts in PostgreSQL, limits in Redis"
    )
    args = parser.parse_args()
    loads = [int(c) for c in args.connections.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="llmrouter-ab-"))
    mock_port = free_port()
    budget = 60 + args.rounds * len(args.revs) * len(loads) * (args.seconds + 2)
    routers: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    with mock_upstream(mock_port, budget, tmp / "mock.log"):
        try:
            for rev in args.revs:
                commit, _, extra = rev.partition("+")
                src = export(commit, tmp / f"rev-{len(routers)}")
                home = tmp / f"home-{len(routers)}"
                config = tmp / f"config-{len(routers)}.yaml"
                text = CONFIG.format(mock_port=mock_port)
                if "server:" in extra:  # its own server settings, instead of the default's
                    text = text.replace("server: {access_log: false}\n", "")
                if args.pg_redis:
                    database_url, redis_url = args.pg_redis.split(",")
                    text += (
                        f"accounts:\n  database_url: {database_url}\n"
                        f"  database_schema: {schema(len(routers))}\n  redis_url: {redis_url}\n"
                    )
                config.write_text(text + extra + "\n")
                env = {**os.environ, "PYTHONPATH": str(src), "LLMROUTER_HOME": str(home)}
                log = tmp / f"router-{len(routers)}.log"
                routers[rev] = serve_keyed(config, env, log, "ab", limited=bool(args.pg_redis))
            results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
            for _ in range(args.rounds):
                for rev, (proc, port, key) in routers.items():
                    for c in loads:
                        r = wrk(
                            port, "/api/v1/completions", c, args.seconds, key, 1,
                            {"router": proc.pid}, body=BODIES[args.body],
                        )  # fmt: skip
                        if r.errors:
                            sys.exit(f"{rev}: {r.errors} errors at c{c}")
                        cpu_ms = r.cpu["router"] / 100 * r.seconds / r.requests * 1000
                        results.setdefault((rev, c), []).append((r.rps, r.p50_ms, r.p99_ms, cpu_ms))
        finally:
            for proc, _, _ in routers.values():
                stop(proc)
            if args.pg_redis:
                for i in range(len(routers)):
                    drop_schema(args.pg_redis.split(",")[0], schema(i))
    med = statistics.median
    print(
        "| revision | load | req/s, each round | median | p50 ms (median) | p99 ms (median) "
        "| router CPU ms/request (median) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for (rev, c), rows in results.items():
        rps = ", ".join(f"{x[0]:,.0f}" for x in rows)
        p50, p99, cpu = (med(x[i] for x in rows) for i in (1, 2, 3))
        print(
            f"| {rev} | c{c} | {rps} | {med(x[0] for x in rows):,.0f} | "
            f"{p50:.3f} | {p99:.3f} | {cpu:.3f} |"
        )
    first = args.revs[0]
    for rev in args.revs[1:]:  # each round's ratio: the machine's drift falls on both alike
        for c in loads:
            ratios = [b[0] / a[0] for a, b in zip(results[(first, c)], results[(rev, c)], strict=True)]
            pairs = zip(results[(first, c)], results[(rev, c)], strict=True)
            # (with --workers the supervisor is measured, not its workers: no CPU figure)
            cpu = [b[3] / a[3] for a, b in pairs if a[3] > 0]
            shown = f"{med(cpu):.3f}" if cpu else "n/a"
            print(
                f"{rev} / {first}, c{c}: req/s {med(ratios):.3f} (round by round, median), "
                f"CPU per request {shown}"
            )


if __name__ == "__main__":
    main()
