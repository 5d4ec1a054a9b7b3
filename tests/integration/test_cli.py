"""The command line: keys, models, help, and one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from llmrouter.accounts.keys import KEY_PATTERN
from tests.conftest import BIN, free_port, router_config, run_cli, start_router, stop


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    created = run_cli(tmp_path, "keys", "create", "--name", "app")
    secret = created.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.match(secret)
    listing = run_cli(tmp_path, "keys", "list").stdout
    assert "app" in listing and "active" in listing and secret not in listing
    store = (tmp_path / "llmrouter.sqlite3").read_bytes()
    assert secret.encode() not in store  # only a hash is kept
    assert run_cli(tmp_path, "keys", "create", "--name", "app", check=False).returncode == 1
    run_cli(tmp_path, "keys", "revoke", "app")
    assert "no keys" in run_cli(tmp_path, "keys", "list").stdout
    assert "revoked" in run_cli(tmp_path, "keys", "list", "--all").stdout
    gone = run_cli(tmp_path, "keys", "revoke", "app", check=False)
    assert gone.returncode == 1 and "no live key" in gone.stderr


def test_hostile_key_names_are_stored_intact(tmp_path: Path) -> None:
    name = "x'); DROP TABLE api_keys; --\t\"ü\x1b[2J"
    run_cli(tmp_path, "keys", "create", "--name", name)
    assert [k["name"] for k in json.loads(run_cli(tmp_path, "keys", "list", "--json").stdout)] == [name]
    table = run_cli(tmp_path, "keys", "list").stdout
    assert "\x1b" not in table and "\t" not in table  # a terminal gets escapes shown, not run
    assert '--\\x09"ü\\x1b[2J' in table


def test_models_names_where_each_is_served(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "models").stdout
    assert "local/smollm2-135m-instruct (default)" in out
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in out
    example = Path(__file__).resolve().parents[2] / "config" / "example.yaml"
    env_out = subprocess.run(
        [str(BIN / "llmrouter"), "--config", str(example), "models"],
        env={**os.environ, "OPENAI_API_KEY": "sk-test", "LLMROUTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "https://api.openai.com/v1" in env_out and "vllm/qwen2.5-7b" in env_out


@pytest.mark.parametrize(
    "args",
    [[], ["serve"], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["models"]],
)
def test_help_everywhere_with_examples(tmp_path: Path, args: list[str]) -> None:
    out = run_cli(tmp_path, *args, "--help").stdout
    assert "usage: llmrouter" in out and "example" in out


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "models: [\n  {id: a, deployments: [{provider: p, model: m}]}]\nproviders: {}\n",
            "unknown provider 'p'",
        ),
        (
            "providers: {p: {kind: openai, base_url: http://x}}\nmodels:\n  - id: a\n    colour: red\n"
            "    deployments: [{provider: p, model: m}]\n",
            "models[0].colour (line 4): unknown key",
        ),
        (
            'providers: {p: {kind: openai, base_url: "${NOPE_UNSET_VAR}"}}\nmodels: []\n',
            "environment variable NOPE_UNSET_VAR is not set",
        ),
        (
            "providers: {p: {kind: llamacpp}}\nmodels:\n  - id: a\n    deployments:\n"
            "      - {provider: p, model: m, model_path: /nonexistent.gguf}\n",
            "model file not found: /nonexistent.gguf",
        ),
        ("providers: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_without_traceback(tmp_path: Path, config: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    result = run_cli(tmp_path, "--config", str(path), "serve", "--port", str(free_port()), check=False)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_taken_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli(tmp_path, "serve", "--port", str(port), check=False)
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    for bad in ("99999", "-5"):
        result = run_cli(tmp_path, "serve", "--port", bad, check=False)
        assert result.returncode != 0
        assert result.stderr.strip() == f"llmrouter: port {bad} is not between 0 and 65535"
    assert "lr-" not in result.stdout  # no key is handed out by a server that cannot start


def test_first_start_prints_a_key_and_a_working_curl(tmp_path: Path) -> None:
    r = start_router(tmp_path, None, create_key=False)
    try:
        out = r.log.read_text()
        secret = next(w for w in out.split() if KEY_PATTERN.match(w))
        assert "curl http://127.0.0.1:" in out and f"Bearer {secret}" in out
        answer = httpx.post(
            f"{r.api}/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={"prompt": "The capital of France is", "max_tokens": 4},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
    finally:
        stop(r.proc)
    assert r.log.read_text().count("lr-") == 2  # the key itself and the curl line; shown once


def test_serve_with_two_workers(tmp_path: Path, fake_upstream: str) -> None:
    r = start_router(tmp_path, router_config(fake_upstream, None), "--workers", "2")
    try:
        children = Path(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children").read_text().split()
        workers = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        for _ in range(10):
            answer = httpx.post(
                f"{r.api}/completions",
                headers=r.headers(),
                json={"model": "fake/ok", "prompt": "Hi"},
                timeout=30,
            )
            assert answer.status_code == 200
    finally:
        stop(r.proc)
    served_by = {
        line.split('"pid":')[1].split(",")[0]
        for line in r.log.read_text().splitlines()
        if '"msg":"request"' in line
    }
    assert served_by and served_by <= set(workers)
