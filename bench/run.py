"""llmrouter's benchmark: the same measurements DIRECT to a mock upstream and THROUGH llmrouter.

    .venv/bin/python bench/run.py [--duration 10] [--warmup 2] [--profile 10] [--perf 10] [--gc-probe]

One run starts `bench/mock_upstream.py`, creates a key in a throw-away LLMROUTER_HOME, starts
`llmrouter serve --workers 1` against the mock, then measures, each number direct and through the
router on the same machine in the same run:

* req/s at concurrency 16 and 64, non-streaming (wrk, closed loop, keep-alive);
* p50/p99 latency at concurrency 1 and 8, non-streaming (wrk's latency histogram);
* streaming time-to-first-token: from writing the request to receiving the first complete
  `data:` line, sequential, measured by this script in a separate client process (raw socket);
* the server process's start-up time (spawn until `GET /health` answers 200), idle RSS (VmRSS one
  second after start-up, before any traffic) and peak RSS (VmHWM after every load);
* req/s at c64 once more with the access log on (the default), logging to a file.

Every load has a warm-up at the same concurrency that is not counted. The table is printed and
written to bench/results/latest.md. After the measurements, `--profile` (py-spy, Python frames) and
`--perf` (perf, C level) profile the router under c64; `--gc-probe` starts it through
bench/gc_probe.py and reports its cyclic GC. See bench/README.md.

Every process it starts has a bounded life: the mock exits by itself, the router gets SIGTERM when
this script ends (and from the kernel if this script dies).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
LLMROUTER = str(VENV_BIN / "llmrouter")
WRK_SCRIPT = BENCH / "wrk_post.lua"
RESULTS = BENCH / "results"
HOST = "127.0.0.1"

BODY = '{"model":"mock/model","prompt":"Say hello","max_tokens":16}'
STREAM_BODY = '{"model":"mock/model","prompt":"Say hello","max_tokens":16,"stream":true}'
ROUTER_PATH = "/api/v1/completions"
DIRECT_PATH = "/v1/completions"

CONFIG = """\
default_model: mock/model
{server}{accounts}providers:
  mock: {{kind: openai, base_url: "http://127.0.0.1:{mock_port}/v1"}}
models:
  - id: mock/model
    resume_streams: {resume}
    deployments: [{{provider: mock, model: mock-model}}]
"""

TARGETS = {
    "rps_c64": 3000.0,  # req/s, at least
    "added_p50_c1_ms": 0.3,
    "added_p99_c1_ms": 1.0,
    "added_ttft_p50_ms": 0.5,
    "idle_rss_mib": 80.0,
    "startup_s": 1.0,
}


# -- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this script's process goes away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get_ok(port: int, path: str, timeout: float = 5.0) -> bool:
    """One GET over a fresh connection; True on a 200. Raises OSError if it cannot connect."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))


def wait_healthy(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> float:
    """Seconds from now until GET /health answers 200 (polling every 2 ms)."""
    started = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before it was healthy")
        try:
            if http_get_ok(port, "/health"):
                return time.perf_counter() - started
        except OSError:
            pass
        if time.perf_counter() - started > deadline_s:
            raise RuntimeError(f"no healthy answer on port {port} within {deadline_s} s")
        time.sleep(0.002)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of one process."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def gc_snapshotter(pid: int, stats: Path) -> Callable[[], dict[str, Any]]:
    """Asks bench/gc_probe.py in `pid` for its GC figures so far (SIGUSR1) and reads them."""
    snap = stats.with_name(stats.name + ".snap")

    def snapshot() -> dict[str, Any]:
        snap.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not snap.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no GC snapshot from {pid}")
            time.sleep(0.005)
        result: dict[str, Any] = json.loads(snap.read_text())
        return result

    return snapshot


@dataclass
class Router:
    proc: subprocess.Popen[bytes]
    port: int
    startup_s: float
    log_path: Path


def start_router(
    home: Path, config: Path, port: int, log_path: Path, gc_stats: Path | None = None
) -> Router:
    """`llmrouter serve --workers 1`; with `gc_stats`, through bench/gc_probe.py, which writes
    the GC's figures there when the server stops."""
    env = {**os.environ, "LLMROUTER_HOME": str(home)}
    env.pop("LLMROUTER_CONFIG", None)
    command = [LLMROUTER]
    if gc_stats is not None:
        command = [sys.executable, str(BENCH / "gc_probe.py")]
        env["BENCH_GC_STATS"] = str(gc_stats)
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*command, "serve", "--config", str(config), "--port", str(port), "--workers", "1"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=_die_with_parent,
        )
    try:
        wait_healthy(port, proc)
    except BaseException:
        stop(proc)
        raise
    return Router(proc, port, time.perf_counter() - started, log_path)


def serve_keyed(
    config: Path, env: dict[str, str], log_path: Path, name: str, *, limited: bool = False
) -> tuple[subprocess.Popen[bytes], int, str]:
    """A key made with `config` (with `limited`, limits it never reaches), then `llmrouter serve`
    on a free port, healthy: for the scripts that run several routers side by side (ab.py,
    kinds.py, floor.py). `env` picks the code and home."""
    env = {**env}
    env.pop("LLMROUTER_CONFIG", None)
    key = subprocess.run(
        [LLMROUTER, "--config", str(config), "keys", "create", "--name", name]
        + (LIMITS if limited else []),
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [LLMROUTER, "serve", "--config", str(config), "--port", str(port)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        wait_healthy(port, proc)
    except BaseException:
        stop(proc)
        raise
    return proc, port, key


# -- load -----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    connections: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, per watched process
    gc: dict[str, Any] | None = None  # with --gc-probe: the router's GC during the load


def wrk(
    port: int,
    path: str,
    connections: int,
    seconds: float,
    auth: str,
    threads: int,
    watch: dict[str, int] | None = None,
    body: str = BODY,
) -> WrkResult:
    env = {**os.environ, "BENCH_BODY": body, "BENCH_AUTH": auth}
    cmd = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(WRK_SCRIPT),
        f"http://{HOST}:{port}{path}",
    ]
    watch = watch or {}
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    elapsed = time.perf_counter() - t0
    cpu = {name: 100 * (cpu_seconds(pid) - before[name]) / elapsed for name, pid in watch.items()}
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.removeprefix("BENCHJSON "))
    errors = sum(v for k, v in r.items() if k.startswith("errors_"))
    duration = r["duration_us"] / 1e6
    return WrkResult(
        connections=connections,
        seconds=duration,
        requests=r["requests"],
        errors=errors,
        rps=r["requests"] / duration,
        p50_ms=r["lat_p50_us"] / 1000,
        p90_ms=r["lat_p90_us"] / 1000,
        p99_ms=r["lat_p99_us"] / 1000,
        mean_ms=r["lat_mean_us"] / 1000,
        cpu=cpu,
    )


def measure(
    port: int,
    path: str,
    c: int,
    args: argparse.Namespace,
    auth: str,
    watch: dict[str, int],
    gc_snapshot: Callable[[], dict[str, Any]] | None = None,
) -> WrkResult:
    if args.warmup > 0:
        wrk(port, path, c, args.warmup, auth, args.wrk_threads)
    before = gc_snapshot() if gc_snapshot else None
    result = wrk(port, path, c, args.duration, auth, args.wrk_threads, watch)
    if gc_snapshot and before:
        after = gc_snapshot()
        result.gc = {
            "cpu_seconds": after["cpu_seconds"] - before["cpu_seconds"],
            "generations": {
                g: {k: v - before["generations"][g][k] for k, v in stats.items()}
                for g, stats in after["generations"].items()
            },
        }
    print(
        f"  {path:<20} c{c:<3} {result.rps:>10,.0f} req/s  p50 {result.p50_ms:.3f} ms  "
        f"p99 {result.p99_ms:.3f} ms  errors {result.errors}  cpu {_cpu_text(result.cpu)}",
        flush=True,
    )
    return result


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in cpu.items()) or "-"


# -- streaming time-to-first-token: a client in its own process -----------------------------------


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[int, dict[bytes, bytes]]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).split(b"\r\n")
    del buf[: end + 4]
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _stream_once(sock: socket.socket, request: bytes) -> tuple[float, float, bytes]:
    """Send one streaming request; (seconds to the first complete `data:` line, seconds to the
    end of the response, body)."""
    buf = bytearray()
    t0 = time.perf_counter()
    sock.sendall(request)
    status, headers = _read_head(sock, buf)
    if status != 200:
        raise RuntimeError(f"status {status}")
    chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
    length = int(headers.get(b"content-length", b"-1"))
    body = bytearray()
    first: float | None = None
    done = False
    while True:
        if chunked:
            while True:  # decode every complete chunk in `buf`
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                if size == 0:
                    if len(buf) >= eol + 4:
                        done = True
                    break
                if len(buf) < eol + 2 + size + 2:
                    break
                body += buf[eol + 2 : eol + 2 + size]
                del buf[: eol + 2 + size + 2]
        else:
            body += buf
            buf.clear()
            done = len(body) >= length >= 0
        if first is None:
            at = body.find(b"data:")
            if at >= 0 and body.find(b"\n", at) >= 0:
                first = time.perf_counter() - t0
        if done:
            break
        chunk = sock.recv(65536)
        if not chunk:
            if length < 0 and not chunked:
                break
            raise ConnectionError("closed mid-response")
        buf += chunk
    if first is None:
        raise RuntimeError("no data: line in the stream")
    return first, time.perf_counter() - t0, bytes(body)


def ttft_client(port: int, path: str, auth: str, n: int, warmup: int) -> dict[str, Any]:
    headers = f"Host: {HOST}\r\nContent-Type: application/json\r\n"
    if auth:
        headers += f"Authorization: Bearer {auth}\r\n"
    body = STREAM_BODY.encode()
    request = f"POST {path} HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    for i in range(warmup + n):
        try:
            first, total, text = _stream_once(sock, request)
            if b"[DONE]" not in text:
                raise RuntimeError("stream without [DONE]")
        except (OSError, RuntimeError, ValueError):
            errors += 1
            sock.close()
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            continue
        if i >= warmup:
            firsts.append(first)
            totals.append(total)
    sock.close()
    return {
        "n": len(firsts),
        "errors": errors,
        "ttft_p50_ms": 1000 * percentile(firsts, 50),
        "ttft_p99_ms": 1000 * percentile(firsts, 99),
        "total_p50_ms": 1000 * percentile(totals, 50),
    }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def run_ttft(port: int, path: str, auth: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_ttft",
        str(port),
        path,
        auth or "-",
        str(args.ttft_requests),
        str(args.ttft_warmup),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  {path:<20} stream TTFT p50 {result['ttft_p50_ms']:.3f} ms  "
        f"p99 {result['ttft_p99_ms']:.3f} ms  (n={result['n']}, errors {result['errors']})",
        flush=True,
    )
    return result


# -- profile (optional, py-spy) -------------------------------------------------------------------


def find_py_spy() -> str | None:
    local = VENV_BIN / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def c64_load(router: Router, auth: str, seconds: int, args: argparse.Namespace) -> Iterator[None]:
    """wrk at c64 against the router for `seconds` + 4 s; the body runs 1.5 s into it."""
    env = {**os.environ, "BENCH_BODY": BODY, "BENCH_AUTH": auth}
    url = f"http://{HOST}:{router.port}{ROUTER_PATH}"
    cmd = ["wrk", f"-t{args.wrk_threads}", "-c64", f"-d{seconds + 4}s", "-s", str(WRK_SCRIPT), url]
    load = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        yield
    finally:
        load.wait(timeout=seconds + 30)


def profile(router: Router, auth: str, seconds: int, args: argparse.Namespace, tmp: Path) -> str:
    """py-spy's sampled Python stacks of the server under c64: where its Python time goes."""
    py_spy = find_py_spy()
    if py_spy is None:
        return "py-spy is not installed (`.venv/bin/pip install py-spy`); no profile taken.\n"
    raw = tmp / "profile.txt"
    rate = 200
    pid = str(router.proc.pid)
    cmd = [py_spy, "record", "-p", pid, "-d", str(seconds), "-r", str(rate), "-f", "raw", "-o", str(raw)]
    with c64_load(router, auth, seconds, args):
        subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=True)
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(raw, RESULTS / "profile-collapsed.txt")
    return summarize_profile(raw.read_text(), seconds * rate)


def _short(frame: str) -> str:
    """`fn (path/to/pkg/mod.py:123)` -> `fn (pkg/mod.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def summarize_profile(collapsed: str, expected_samples: float, top: int = 15) -> str:
    leaf: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf[frames[-1]] += n
        if len(frames) > 1:
            callers.setdefault(frames[-1], Counter())[frames[-2]] += n
        for f in set(frames):
            inclusive[f] += n
    if total == 0:
        return "py-spy recorded no samples.\n"

    def caller(frame: str) -> str:
        found = callers.get(frame)
        if not found:
            return ""
        name, n = found.most_common(1)[0]
        return f"`{name.split(' (')[0]}` ({100 * n / leaf[frame]:.0f}%)"

    # Frames on (nearly) every stack are the server's main loop; they say nothing.
    telling = [(f, n) for f, n in inclusive.most_common() if n < 0.97 * total][: top + 10]
    lines = [
        f"py-spy (Python frames), {total} samples of the busy main thread out of "
        f"~{expected_samples:.0f} ({100 * total / max(expected_samples, 1):.0f}% busy) under wrk c64. "
        "Self time of a Python frame includes the C code and syscalls it calls; "
        "`Runner.run` self time is uvloop's own loop (C).",
        "",
        "| self % | frame (leaf) | mostly called from |",
        "|---:|---|---|",
        *(f"| {100 * n / total:.1f} | `{f}` | {caller(f)} |" for f, n in leaf.most_common(top)),
        "",
        "| inclusive % | frame |",
        "|---:|---|",
        *(f"| {100 * n / total:.1f} | `{f}` |" for f, n in telling),
    ]
    return "\n".join(lines) + "\n"


_NATIVE = {
    "loop": "uvloop",
    "parser": "httptools",
    "url_parser": "httptools",
    "_core": "msgspec",
    "_http_parser": "aiohttp parser",
    "_http_writer": "aiohttp writer",
    "_multidict": "multidict",
    "_asyncio": "CPython _asyncio",
}
_GC_SYMBOL = ("gc_collect", "visit_decref", "visit_reachable", "_traverse", "VisitInstanceAttributes")


def perf_profile(router: Router, auth: str, seconds: int, args: argparse.Namespace, tmp: Path) -> str:
    """`perf record` of the server under c64 (CPU samples, C level): how its CPU time splits
    between the interpreter, the cyclic GC, the kernel (sockets) and native extensions."""
    if shutil.which("perf") is None:
        return "perf is not installed; no CPU breakdown taken.\n"
    data = tmp / "perf.data"
    cmd = ["perf", "record", "-F", "997", "-p", str(router.proc.pid), "-o", str(data)]
    with c64_load(router, auth, seconds, args):
        subprocess.run(
            [*cmd, "--", "sleep", str(seconds)], capture_output=True, timeout=seconds + 60, check=True
        )
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    groups: dict[str, float] = {}
    symbols: list[tuple[float, str, str]] = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 4 or line.startswith("#") or not parts[0].endswith("%"):
            continue
        share, dso, symbol = float(parts[0][:-1]), parts[1], " ".join(parts[3:])
        symbols.append((share, dso, symbol))
        if dso.startswith("[kernel"):
            group = "kernel (syscalls, loopback TCP)"
        elif "libpython" in dso and any(g in symbol for g in _GC_SYMBOL):
            group = "CPython cyclic GC"
        elif "libpython" in dso:
            group = "CPython interpreter, objects, allocator"
        elif "sqlite" in dso:
            group = "SQLite (key lookup)"
        else:
            name = dso.split(".cpython")[0]
            group = f"native: {_NATIVE.get(name, name)}"
        groups[group] = groups.get(group, 0.0) + share
    if not symbols:
        return "perf recorded no samples (is perf allowed in this container?).\n"
    lines = [
        f"perf record -F 997 for {seconds} s under wrk c64 (CPU samples of the server process).",
        "",
        "| CPU % | where |",
        "|---:|---|",
        *(f"| {v:.1f} | {k} |" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:10]),
        "",
        "| CPU % | top symbols | in |",
        "|---:|---|---|",
        *(f"| {share:.1f} | `{symbol}` | {dso} |" for share, dso, symbol in symbols[:15]),
    ]
    return "\n".join(lines) + "\n"


# -- the run --------------------------------------------------------------------------------------


# With --limited, the key has limits it never reaches, so every request goes through the limiter
# (one round trip to Redis when --redis-url is given) and settles its usage and cost.
LIMITS = ["--rpm", "100000000", "--tpm", "1000000000", "--credit-limit", "1000000000"]


def create_key(home: Path, config: Path, limited: bool = False) -> str:
    env = {**os.environ, "LLMROUTER_HOME": str(home)}
    out = subprocess.run(
        [LLMROUTER, "--config", str(config), "keys", "create", "--name", "bench"]
        + (LIMITS if limited else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1].strip()


def sanity(router_port: int, mock_port: int, key: str) -> None:
    """One non-streaming and one streaming request each way, checked, before measuring."""
    for port, path, auth in ((mock_port, DIRECT_PATH, ""), (router_port, ROUTER_PATH, key)):
        headers = f"Host: {HOST}\r\nContent-Type: application/json\r\n"
        if auth:
            headers += f"Authorization: Bearer {auth}\r\n"
        for body, stream in ((BODY, False), (STREAM_BODY, True)):
            raw = body.encode()
            req = f"POST {path} HTTP/1.1\r\n{headers}Content-Length: {len(raw)}\r\n\r\n".encode() + raw
            with socket.create_connection((HOST, port), timeout=10) as s:
                _, _, text = _stream_once(s, req) if stream else (0, 0, _plain_once(s, req))
            expected = b"[DONE]" if stream else b'"text_completion"'
            if expected not in text or b"Hello" not in text:
                raise RuntimeError(f"unexpected answer from {port}{path}: {text[:300]!r}")


def _plain_once(sock: socket.socket, request: bytes) -> bytes:
    buf = bytearray()
    sock.sendall(request)
    status, headers = _read_head(sock, buf)
    length = int(headers.get(b"content-length", b"0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    if status != 200:
        raise RuntimeError(f"status {status}: {bytes(buf)[:300]!r}")
    return bytes(buf)


@contextlib.contextmanager
def mock_upstream(port: int, budget_s: float, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "mock_upstream.py"),
                str(port),
                "--max-seconds",
                f"{budget_s:.0f}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=_die_with_parent,
        )
    try:
        wait_healthy(port, proc, deadline_s=15)
        yield proc
    finally:
        stop(proc)


def mib(kb: int) -> float:
    return kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description="llmrouter benchmark: direct vs through the router")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured load")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--ttft-requests", type=int, default=2000)
    parser.add_argument("--ttft-warmup", type=int, default=200)
    parser.add_argument("--startup-trials", type=int, default=5, help="extra cold starts to time")
    parser.add_argument("--profile", type=int, default=0, help="py-spy seconds under c64 (0: off)")
    parser.add_argument("--perf", type=int, default=0, help="perf record seconds under c64 (0: off)")
    parser.add_argument(
        "--gc-probe",
        action="store_true",
        help="start the measured router through bench/gc_probe.py and report its GC figures "
        "(BENCH_GC_FREEZE=1 / BENCH_GC_THRESHOLD=a,b,c in the environment for what-ifs)",
    )
    parser.add_argument(
        "--database-url", help="the ledger and keys in PostgreSQL (default: SQLite in a temp home)"
    )
    parser.add_argument("--redis-url", help="limits in Redis (default: in process)")
    parser.add_argument("--limited", action="store_true", help="the key has (unreached) limits")
    parser.add_argument(
        "--ledger-sync", choices=("full", "normal"), default="full", help="SQLite's ledger sync"
    )
    parser.add_argument(
        "--resume-streams", action="store_true", help="the model continues cut streams elsewhere"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")

    tmp = Path(tempfile.mkdtemp(prefix="llmrouter-bench-"))
    home = tmp / "home"
    home.mkdir()
    mock_port, router_port = free_port(), free_port()
    quiet_cfg, logging_cfg = tmp / "quiet.yaml", tmp / "logging.yaml"
    accounts = ""
    if args.database_url or args.redis_url or args.ledger_sync != "full":
        schema = f"bench_{os.getpid()}"
        accounts = f"accounts:\n  ledger_sync: {args.ledger_sync}\n" + (
            f"  database_url: {args.database_url}\n  database_schema: {schema}\n"
            if args.database_url
            else ""
        )
        accounts += f"  redis_url: {args.redis_url}\n" if args.redis_url else ""
    quiet = "server: {access_log: false}\n"
    resume = str(args.resume_streams).lower()
    quiet_cfg.write_text(
        CONFIG.format(server=quiet, accounts=accounts, mock_port=mock_port, resume=resume)
    )
    logging_cfg.write_text(
        CONFIG.format(server="", accounts=accounts, mock_port=mock_port, resume=resume)
    )
    per_load = args.warmup + args.duration + 1
    budget = 20 * per_load + 2 * args.ttft_requests * 0.01 + 10 * args.startup_trials + 300
    budget += 2 * (args.profile + args.perf)
    started_at = dt.datetime.now(dt.UTC)
    r: dict[str, Any] = {}

    key = create_key(home, quiet_cfg, args.limited)
    with mock_upstream(mock_port, budget, tmp / "mock.log") as mock:
        print(f"mock upstream pid {mock.pid} on {mock_port}; temp {tmp}", flush=True)

        print(f"start-up: {args.startup_trials} cold starts", flush=True)
        startups, idle_rss = [], []
        for i in range(args.startup_trials):
            router = start_router(home, quiet_cfg, router_port, tmp / f"startup{i}.log")
            startups.append(router.startup_s)
            time.sleep(1.0)
            idle_rss.append(proc_status(router.proc.pid)["VmRSS"])
            stop(router.proc)
        print(f"  {', '.join(f'{s:.3f}' for s in startups)} s", flush=True)

        gc_stats = tmp / "gc.json" if args.gc_probe else None
        router = start_router(home, quiet_cfg, router_port, tmp / "router.log", gc_stats)
        try:
            pid = router.proc.pid
            startups.append(router.startup_s)
            time.sleep(1.0)
            idle = proc_status(pid)["VmRSS"]
            idle_rss.append(idle)
            r["children"] = children(pid)
            sanity(router_port, mock_port, key)
            print(
                f"router pid {pid} on {router_port}: up in {router.startup_s:.3f} s, "
                f"idle RSS {mib(idle):.1f} MiB",
                flush=True,
            )
            watch_direct = {"mock": mock.pid}
            snapshot = gc_snapshotter(pid, gc_stats) if gc_stats is not None else None
            watch_router = {"router": pid, "mock": mock.pid}
            for c in (16, 64, 1, 8):
                print(f"c{c}:", flush=True)
                r[f"direct_c{c}"] = measure(mock_port, DIRECT_PATH, c, args, "", watch_direct)
                r[f"router_c{c}"] = measure(
                    router_port, ROUTER_PATH, c, args, key, watch_router, snapshot
                )
            print("streaming TTFT, sequential:", flush=True)
            r["ttft_direct"] = run_ttft(mock_port, DIRECT_PATH, "", args)
            r["ttft_router"] = run_ttft(router_port, ROUTER_PATH, key, args)
            status = proc_status(pid)
            r["rss_after_kb"], r["peak_kb"] = status["VmRSS"], status["VmHWM"]
            if args.profile > 0:
                print(f"py-spy {args.profile} s under c64", flush=True)
                r["profile"] = profile(router, key, args.profile, args, tmp)
            if args.perf > 0:
                print(f"perf {args.perf} s under c64", flush=True)
                r["perf"] = perf_profile(router, key, args.perf, args, tmp)
            r["router_cpu_s"] = cpu_seconds(pid)
        finally:
            stop(router.proc)
        if gc_stats is not None and gc_stats.exists():
            r["gc"] = json.loads(gc_stats.read_text())

        print("access log on (the default), c64:", flush=True)
        logged = start_router(home, logging_cfg, router_port, tmp / "router-logging.log")
        try:
            r["logged_c64"] = measure(
                router_port, ROUTER_PATH, 64, args, key, {"router": logged.proc.pid, "mock": mock.pid}
            )
            r["logged_peak_kb"] = proc_status(logged.proc.pid)["VmHWM"]
        finally:
            stop(logged.proc)
        r["log_bytes"] = logged.log_path.stat().st_size

    r["startups"] = startups
    r["idle_rss_kb"] = idle_rss
    report = render(r, args, started_at)
    if "gc" in r:
        report += "\n" + render_gc(r["gc"], r["router_cpu_s"], r)
    if "profile" in r:
        report += "\n### Profile: Python frames\n\n" + r["profile"]
    if "perf" in r:
        report += "\n### Profile: CPU (perf)\n\n" + r["perf"]
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.database_url:
        drop_schema(args.database_url, f"bench_{os.getpid()}")


def drop_schema(url: str, schema: str) -> None:
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


# -- the report -----------------------------------------------------------------------------------


def render_gc(gc: dict[str, Any], cpu_s: float, r: dict[str, Any]) -> str:
    gens = gc["generations"]
    total = sum(g["seconds"] for g in gens.values())
    what_if = []
    if gc["freeze"]:
        what_if.append(f"gc.freeze() after start-up ({gc['frozen']:,} objects frozen)")
    if os.environ.get("BENCH_GC_THRESHOLD"):
        what_if.append(f"threshold {tuple(gc['threshold'])}")
    lines = [
        "### Cyclic GC in the measured router (bench/gc_probe.py)",
        "",
        f"What-if: {', '.join(what_if) or 'none (CPython defaults)'}. The router used "
        f"{cpu_s:.1f} CPU s over the run; collections took {total:.2f} s of it "
        f"({100 * total / max(cpu_s, 1e-9):.1f}%).",
        "",
        "| generation | collections | seconds | ms each | objects freed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, g in sorted(gens.items()):
        each = 1000 * g["seconds"] / g["collections"] if g["collections"] else 0.0
        lines.append(
            f"| {name} | {g['collections']:,} | {g['seconds']:.3f} | {each:.3f} | {g['collected']:,} |"
        )
    lines += [
        "",
        "During each measured router load:",
        "",
        "| load | router CPU s | in GC | collections gen0 / gen1 / gen2 | gen2 ms each |",
        "|---|---:|---:|---|---:|",
    ]
    for c in (16, 64, 1, 8):
        during = r[f"router_c{c}"].gc
        if during is None:
            continue
        g = during["generations"]
        spent = sum(x["seconds"] for x in g.values())
        counts = " / ".join(f"{g[k]['collections']:,}" for k in sorted(g))
        gen2 = g["2"]
        each = 1000 * gen2["seconds"] / gen2["collections"] if gen2["collections"] else 0.0
        lines.append(
            f"| c{c} | {during['cpu_seconds']:.2f} | {spent:.3f} s "
            f"({100 * spent / max(during['cpu_seconds'], 1e-9):.1f}%) | {counts} | {each:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(r: dict[str, Any], args: argparse.Namespace, started_at: dt.datetime) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    wrk_line = (wrk_version.stdout or wrk_version.stderr).splitlines()[0].split(" Copyright")[0]
    rows: list[str] = []

    def row(metric: str, direct: str, router: str, delta: str, target: str, verdict: str) -> None:
        rows.append(f"| {metric} | {direct} | {router} | {delta} | {target} | {verdict} |")

    for c in (16, 64):
        d, x = r[f"direct_c{c}"], r[f"router_c{c}"]
        target, verdict = ("≥ 3,000", _verdict(x.rps >= TARGETS["rps_c64"])) if c == 64 else ("", "")
        row(f"req/s, c{c}", f"{d.rps:,.0f}", f"{x.rps:,.0f}", f"{x.rps / d.rps:.3f}×", target, verdict)
    lg = r["logged_c64"]
    d64 = r["direct_c64"]
    row(
        "req/s, c64, access log on (default)",
        f"{d64.rps:,.0f}",
        f"{lg.rps:,.0f}",
        f"{lg.rps / d64.rps:.3f}×",
        "≥ 3,000",
        _verdict(lg.rps >= TARGETS["rps_c64"]),
    )
    for c in (1, 8):
        d, x = r[f"direct_c{c}"], r[f"router_c{c}"]
        for p in (50, 99):
            dv, xv = getattr(d, f"p{p}_ms"), getattr(x, f"p{p}_ms")
            added = xv - dv
            target = verdict = ""
            if c == 1:
                limit = TARGETS[f"added_p{p}_c1_ms"]
                target, verdict = f"added ≤ {limit:g} ms", _verdict(added <= limit)
            row(
                f"latency p{p}, c{c} (ms)", f"{dv:.3f}", f"{xv:.3f}", f"+{added:.3f} ms", target, verdict
            )
    td, tr = r["ttft_direct"], r["ttft_router"]
    for p in (50, 99):
        dv, xv = td[f"ttft_p{p}_ms"], tr[f"ttft_p{p}_ms"]
        target = verdict = ""
        if p == 50:
            target = "added ≤ 0.5 ms"
            verdict = _verdict(xv - dv <= TARGETS["added_ttft_p50_ms"])
        row(
            f"streaming TTFT p{p}, c1 (ms)",
            f"{dv:.3f}",
            f"{xv:.3f}",
            f"+{xv - dv:.3f} ms",
            target,
            verdict,
        )
    row(
        "whole stream p50, c1 (ms)",
        f"{td['total_p50_ms']:.3f}",
        f"{tr['total_p50_ms']:.3f}",
        f"+{tr['total_p50_ms'] - td['total_p50_ms']:.3f} ms",
        "",
        "",
    )
    idle = statistics.median(r["idle_rss_kb"])
    row(
        "idle RSS (MiB), median of starts",
        "",
        f"{mib(idle):.1f}",
        "",
        "≤ 80",
        _verdict(mib(idle) <= TARGETS["idle_rss_mib"]),
    )
    peak = max(r["peak_kb"], r["logged_peak_kb"])
    row("peak RSS (MiB), VmHWM after all loads", "", f"{mib(peak):.1f}", "", "", "")
    s = r["startups"]
    row(
        f"start-up to /health 200 (s), median of {len(s)}",
        "",
        f"{statistics.median(s):.3f}",
        f"min {min(s):.3f}, max {max(s):.3f}",
        "≤ 1",
        _verdict(max(s) <= TARGETS["startup_s"]),
    )

    cpu_rows = []
    for label, key in (("c16", "16"), ("c64", "64"), ("c1", "1"), ("c8", "8")):
        d, x = r[f"direct_c{key}"], r[f"router_c{key}"]
        cpu_rows.append(
            f"| {label} | {d.requests:,} / {d.errors} | {_cpu_text(d.cpu)} | "
            f"{x.requests:,} / {x.errors} | {_cpu_text(x.cpu)} |"
        )
    cpu_rows.append(f"| c64, access log on | | | {lg.requests:,} / {lg.errors} | {_cpu_text(lg.cpu)} |")

    return "\n".join(
        [
            f"## llmrouter benchmark, {started_at:%Y-%m-%d %H:%M} UTC",
            "",
            f"Machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
            f"{platform.python_version()}; {wrk_line}, -t{args.wrk_threads}; one llmrouter worker; "
            f"{args.duration:g} s per load after {args.warmup:g} s warm-up; nothing pinned.",
            f"Accounts: ledger in "
            f"{'PostgreSQL' if args.database_url else f'SQLite (sync {args.ledger_sync})'}, limits "
            f"{'in Redis' if args.redis_url else 'in process'}, the key "
            f"{'with (unreached) rpm, tpm and credit limits' if args.limited else 'without limits'}"
            f"{'; streams resumable (resume_streams)' if args.resume_streams else ''}.",
            "",
            "| metric | direct (mock) | through llmrouter | router vs direct | target | |",
            "|---|---:|---:|---:|---|---|",
            *rows,
            "",
            "Requests / errors (non-2xx or socket) and CPU (% of one core) during each measured load:",
            "",
            "| load | direct requests / errors | direct CPU | router requests / errors | router CPU |",
            "|---|---:|---|---:|---|",
            *cpu_rows,
            "",
            f"Access log: {r['log_bytes'] / 1e6:.1f} MB written to a file during the access-log run. "
            f"Server child processes: {r['children'] or 'none'}. "
            f"Start-ups (s): {', '.join(f'{x:.3f}' for x in s)}.",
            "",
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_ttft":
        _, _, port, path, auth, n, warmup = sys.argv
        print(json.dumps(ttft_client(int(port), path, "" if auth == "-" else auth, int(n), int(warmup))))
    else:
        main()
