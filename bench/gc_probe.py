"""Run the `llmrouter` command with CPython's cyclic GC instrumented: a diagnostic for the benchmark.

    BENCH_GC_STATS=gc.json python bench/gc_probe.py serve --config CFG --port P --workers 1

Same arguments as `llmrouter`. At exit (SIGTERM ends `serve` cleanly) it writes, per generation,
how many collections ran, the seconds they took and the objects they freed, to BENCH_GC_STATS;
SIGUSR1 writes the same figures so far, with the process's CPU seconds, to BENCH_GC_STATS.snap.
Two what-ifs, without touching llmrouter's code:

* BENCH_GC_FREEZE=1 - `gc.collect(); gc.freeze()` once the app is built, so the objects that live
  for the whole process (modules, config, pools) leave the GC's generations;
* BENCH_GC_THRESHOLD=700,10,10 - `gc.set_threshold(...)` at start.

`bench/run.py --gc-probe` starts the router through this file and adds the figures to its report.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import time
from typing import Any

_started: dict[int, float] = {}
_stats = {g: {"collections": 0, "seconds": 0.0, "collected": 0} for g in range(3)}
_born = time.monotonic()
_dumped: list[bool] = []  # written once, by the SIGTERM handler or at exit


def _callback(phase: str, info: dict[str, Any]) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
        return
    entry = _stats[generation]
    entry["collections"] += 1
    entry["seconds"] += time.perf_counter() - _started.pop(generation, time.perf_counter())
    entry["collected"] += info.get("collected", 0)


def _dump() -> None:
    path = os.environ.get("BENCH_GC_STATS")
    if not path or _dumped:
        return
    _dumped.append(True)
    report = {
        "wall_seconds": time.monotonic() - _born,
        "threshold": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
        "freeze": os.environ.get("BENCH_GC_FREEZE") == "1",
        "generations": _stats,
    }
    with open(path, "w") as out:
        json.dump(report, out)


def _snapshot(signum: int, frame: object) -> None:
    """SIGUSR1: the figures so far, with the process's CPU time, to BENCH_GC_STATS + ".snap"."""
    path = os.environ.get("BENCH_GC_STATS")
    if not path:
        return
    with open(path + ".snap.tmp", "w") as out:
        json.dump({"cpu_seconds": time.process_time(), "generations": _stats}, out)
    os.replace(path + ".snap.tmp", path + ".snap")


def _install() -> None:
    threshold = os.environ.get("BENCH_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    if os.environ.get("BENCH_GC_FREEZE") == "1":
        import llmrouter.app

        build = llmrouter.app.create_app_from_environment

        def build_then_freeze() -> llmrouter.app.App:
            app = build()
            gc.collect()
            gc.freeze()
            return app

        # uvicorn imports the factory by name after this, so the patched one is what it calls.
        llmrouter.app.create_app_from_environment = build_then_freeze
    gc.callbacks.append(_callback)
    atexit.register(_dump)
    # uvicorn restores the previous handlers after its graceful shutdown and raises the signal
    # again; this handler then writes the figures and exits as SIGTERM would.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGUSR1, _snapshot)


def _on_sigterm(signum: int, frame: object) -> None:
    _dump()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    _install()
    from llmrouter.cli import main

    sys.argv[0] = "llmrouter"
    sys.exit(main())
