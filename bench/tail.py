"""The slow requests of a c1 load, and the time between them: what puts a tail into p99.

    .venv/bin/python bench/tail.py URL KEY [--seconds 10] [--body JSON] [--over MS]

One client, one keep-alive connection, requests one after another (a raw socket and run.py's
`_plain_once`, as its TTFT client: its own time is small and in every figure alike). It prints
p50 and p99, how many requests took more than the median plus `--over` (2 ms), how often that
happened a second, and the median and spread of the time between two such requests: a period
names its cause (about 100 ms was the ledger's commit, bench/README.md, 2026-12-03; one second,
the journal's fdatasync). URL is the server's /api/v1/completions; KEY a key it accepts.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import _plain_once

BODY = '{"model":"mock/model","prompt":"Say hello","max_tokens":16}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--body", default=BODY)
    parser.add_argument("--over", type=float, default=2.0, help="ms over the median that is slow")
    args = parser.parse_args()
    url = urllib.parse.urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = args.body.encode()
    request = (
        f"POST {url.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {args.key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    timed: list[tuple[float, float]] = []  # (when it began, since the start; how long it took)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        end = start + args.seconds
        while (began := time.perf_counter()) < end:
            _plain_once(sock, request)  # (a status other than 200 raises)
            timed.append((began - start, time.perf_counter() - began))
    took = sorted(t for _, t in timed)
    p50, p99 = took[len(took) // 2], took[int(len(took) * 0.99)]
    slow = [at for at, t in timed if t > p50 + args.over / 1000]
    print(
        f"{len(timed)} requests: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms; "
        f"{len(slow)} over p50 + {args.over:g} ms ({100 * len(slow) / len(timed):.2f} %, "
        f"{len(slow) / args.seconds:.1f} a second)"
    )
    gaps = sorted(b - a for a, b in itertools.pairwise(slow))
    if gaps:
        print(
            f"between two of them: median {gaps[len(gaps) // 2] * 1e3:.1f} ms, "
            f"p10 {gaps[len(gaps) // 10] * 1e3:.1f} ms, p90 {gaps[len(gaps) * 9 // 10] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
