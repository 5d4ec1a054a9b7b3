"""Several replicas on loopback, the production shape: routers sharing PostgreSQL and Redis.
Limits hold exactly across them, one replica's ejection of a deployment protects the others, and
`kill -9` of a server under load loses no record of a response a client fully received."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    BIN,
    PG_URL,
    Router,
    drop_redis_namespace,
    free_port,
    run_cli,
    start_router,
    stop,
    wait_http,
)


def shared_config(fake: str, schema: str, redis: str) -> str:
    return f"""providers:
  fake: {{kind: openai, base_url: {fake}/v1}}
models:
  - {{id: fake/ok, deployments: [{{provider: fake, model: ok}}]}}
  - id: fake/flaky
    strategy: ordered
    deployments:
      - {{provider: fake, model: status-503}}
      - {{provider: fake, model: ok}}
routing:
  retry_budget: {{min_per_second: 1000}}
  health: {{consecutive_failures: 2, cooldown_seconds: 30}}
accounts:
  database_url: {PG_URL}
  database_schema: {schema}
  redis_url: {redis}
  redis_namespace: {schema}  # this test's replicas share health and limits with no one else
"""


@pytest.fixture
def replicas(
    tmp_path: Path, fake_upstream: str, pg_schema: str, redis_url: str
) -> Iterator[tuple[Router, Router]]:
    text = shared_config(fake_upstream, pg_schema, redis_url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_router(tmp_path / "a", text)
    try:
        second = start_router(tmp_path / "b", text, create_key=False)
        try:
            yield first, second
        finally:
            stop(second.proc)
    finally:
        stop(first.proc)
        drop_redis_namespace(pg_schema)


def test_a_limit_is_exact_across_two_replicas(replicas: tuple[Router, Router]) -> None:
    a, b = replicas
    limit, sent = 17, 60
    secret = a.cli("keys", "create", "--name", "shared", "--rpm", str(limit)).stdout.split()[-1]
    barrier = threading.Barrier(sent)

    def one(i: int) -> int:
        router = (a, b)[i % 2]
        barrier.wait()
        r = httpx.post(
            f"{router.api}/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"model": "fake/ok", "prompt": "hi"},
            timeout=30,
        )
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(sent) as pool:
        statuses = list(pool.map(one, range(sent)))
    assert statuses.count(200) == limit, statuses
    assert statuses.count(429) == sent - limit


def test_one_replicas_ejection_protects_the_other(replicas: tuple[Router, Router]) -> None:
    a, b = replicas

    def attempts(router: Router) -> str:
        r = httpx.post(
            f"{router.api}/completions",
            headers=a.headers(),
            json={"model": "fake/flaky", "prompt": "hi"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r.headers["x-llmrouter-attempts"]

    assert "fake/status-503 upstream_unavailable" in attempts(a)
    assert "fake/status-503" in attempts(a)  # the second failure in a row ejects it
    time.sleep(1.0)  # "within a second"
    assert "status-503" not in attempts(b), "b did not hear of a's ejection"


# -- kill -9 under load ---------------------------------------------------------------------------


def _serve(home: Path, config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [str(BIN / "llmrouter"), "serve", "--config", str(config), "--port", str(port)],
            env={**os.environ, "LLMROUTER_HOME": str(home)},
            stdout=sink,
            stderr=sink,
        )


def _load(base: str, secret: str, stop_at: threading.Event, received: list[str], cut: list[int]) -> None:
    """Requests until told to stop; the ids of responses received whole, and a count of those
    cut short."""
    stream = False
    with httpx.Client(timeout=10) as client:
        while not stop_at.is_set():
            stream = not stream
            body: dict[str, Any] = {"model": "fake/ok", "prompt": "hi", "stream": stream}
            try:
                with client.stream(
                    "POST",
                    f"{base}/api/v1/completions",
                    headers={"Authorization": f"Bearer {secret}"},
                    json=body,
                ) as r:
                    data = r.read()
                    if r.status_code != 200:
                        cut[0] += 1
                        continue
                    if stream:
                        if not data.endswith(b"data: [DONE]\n\n"):
                            cut[0] += 1
                            continue
                        first = data.split(b"\n\n", 1)[0].removeprefix(b"data: ")
                        received.append(json.loads(first)["id"])
                    else:
                        received.append(json.loads(data)["id"])
            except (httpx.HTTPError, ValueError):
                cut[0] += 1
                time.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_under_load_loses_and_doubles_no_record(
    tmp_path: Path, fake_upstream: str, backend: str, request: pytest.FixtureRequest
) -> None:
    database = ""
    if backend == "postgres":
        schema = request.getfixturevalue("pg_schema")
        database = f"accounts: {{database_url: '{PG_URL}', database_schema: {schema}}}\n"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"providers:\n  fake: {{kind: openai, base_url: {fake_upstream}/v1}}\n"
        "models:\n  - {id: fake/ok, deployments: [{provider: fake, model: ok}]}\n" + database
    )
    home = tmp_path / "home"
    created = run_cli(home, "--config", str(config), "keys", "create", "--name", "load")
    secret = created.stdout.split()[-1]
    received: list[str] = []
    cut = [0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    for _ in range(3):
        proc = _serve(home, config, port, tmp_path / "router.log")
        try:
            wait_http(f"{base}/ready", proc)
            stop_at = threading.Event()
            clients = [
                threading.Thread(target=_load, args=(base, secret, stop_at, received, cut))
                for _ in range(8)
            ]
            for t in clients:
                t.start()
            time.sleep(1.5)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            stop_at.set()
            for t in clients:
                t.join(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(received) > 50, "the load was too light to mean anything"
    assert len(set(received)) == len(received)
    rows = _ledger_ids(config, home)
    assert len(rows) == len(set(rows)), "a record was written twice"
    missing = set(received) - set(rows)
    assert not missing, f"{len(missing)} responses received whole have no record"
    # Records of responses cut short by the kill may exist (the record is durable before the
    # last bytes leave): at most the requests in flight at each kill.
    assert len(set(rows) - set(received)) <= 8 * 3


def _ledger_ids(config: Path, home: Path) -> list[str]:
    script = (
        "import asyncio, sys\n"
        "from llmrouter.settings import load_settings, llmrouter_home\n"
        "from llmrouter.accounts.store import open_database\n"
        "async def main():\n"
        "    s = load_settings(sys.argv[1])\n"
        "    db = await open_database(s.accounts.database_url, llmrouter_home(s),"
        " schema=s.accounts.database_schema)\n"
        "    for (rid,) in await db.fetchall('SELECT request_id FROM ledger'):\n"
        "        print(rid)\n"
        "    await db.aclose()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [str(BIN / "python"), "-c", script, str(config)],
        env={**os.environ, "LLMROUTER_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.split()


def test_serve_workers_share_the_store(tmp_path: Path, fake_upstream: str) -> None:
    config = (
        f"providers:\n  fake: {{kind: openai, base_url: {fake_upstream}/v1}}\n"
        "models:\n  - {id: fake/ok, deployments: [{provider: fake, model: ok}]}\n"
    )
    router = start_router(tmp_path, config, "--workers", "2")
    try:
        ids = []
        with httpx.Client(timeout=10) as client:
            for _ in range(20):  # new connections spread over both workers
                r = client.post(
                    f"{router.api}/completions",
                    headers={**router.headers(), "Connection": "close"},
                    json={"model": "fake/ok", "prompt": "hi"},
                )
                assert r.status_code == 200
                ids.append(r.json()["id"])
        # Each worker's writer moves its journal into the file in batches, a moment after the
        # answer (on a busy machine, a longer one): wait for every record, a bounded time.
        deadline = time.monotonic() + 15
        while not set(ids) <= set(rows := _ledger_ids(router.config, router.home)):
            assert time.monotonic() < deadline, f"{len(set(ids) - set(rows))} records never came"
            time.sleep(0.2)
    finally:
        stop(router.proc)


def test_a_shared_database_starts_without_printing_a_key(
    tmp_path: Path, fake_upstream: str, pg_schema: str
) -> None:
    config = (
        f"providers:\n  fake: {{kind: openai, base_url: {fake_upstream}/v1}}\n"
        "models:\n  - {id: fake/ok, deployments: [{provider: fake, model: ok}]}\n"
        f"accounts: {{database_url: '{PG_URL}', database_schema: {pg_schema}}}\n"
    )
    router = start_router(tmp_path, config, create_key=False)
    try:
        log = router.log.read_text()
        assert "lr-" not in log and "first start" not in log
        assert router.cli("keys", "list").stdout.strip() == "no keys"
    finally:
        stop(router.proc)
