"""What the dashboard's tests share: a router config with the prompts stored, an admin key, a
logged-in httpx client, and raw HTTP for paths that a client library would tidy up."""

from __future__ import annotations

import re
import socket
from typing import Any

import httpx

from tests.conftest import UPSTREAM_KEYS, Router

# Each answer from the fake costs 3 * 0.1 + 2 * 0.2 = 0.7 (usage: 3 prompt, 2 completion tokens).
PRICING = "{prompt: 100000, completion: 200000}"


def dashboard_config(fake: str, *, logins_per_minute: int = 1000, store_prompts: bool = True) -> str:
    return f"""providers:
  fake:
    kind: openai
    base_url: {fake}/v1
    api_key: {UPSTREAM_KEYS["fake"]}
    timeouts: {{connect: 1, first_token: 3, idle: 1, total: 4}}
models:
  - {{id: fake/ok, pricing: {PRICING}, deployments: [{{provider: fake, model: ok}}]}}
  - {{id: fake/cheap, deployments: [{{provider: fake, model: ok}}]}}
  - {{id: fake/say, pricing: {PRICING}, deployments: [{{provider: fake, model: say-prompt}}]}}
  - {{id: fake/status-500, deployments: [{{provider: fake, model: status-500}}]}}
  - id: fake/fallback
    strategy: ordered
    deployments:
      - {{provider: fake, model: status-503}}
      - {{provider: fake, model: ok}}
routing:
  max_attempts: 2
  retry_budget: {{min_per_second: 1000}}
  health: {{consecutive_failures: 1000000, min_attempts: 1000000}}
accounts:
  store_prompts: {"true" if store_prompts else "false"}
dashboard:
  login_attempts_per_minute: {logins_per_minute}
"""


def admin_key(router: Router, name: str = "admin") -> str:
    out = router.cli("keys", "create", "--name", name, "--admin")
    return out.stdout.strip().splitlines()[-1]


def login(router: Router, key: str) -> httpx.Client:
    """A client holding a session's cookie (it follows no redirects)."""
    client = httpx.Client(base_url=router.base, timeout=30)
    r = client.post("/admin/login", data={"key": key})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/admin"
    return client


def csrf(client: httpx.Client, path: str = "/admin/keys") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def send(router: Router, body: dict[str, Any], endpoint: str = "completions") -> httpx.Response:
    return httpx.post(f"{router.api}/{endpoint}", headers=router.headers(), json=body, timeout=30)


def raw(router: Router, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as written (`//admin`, `/x/../admin`), its status, headers and body."""
    port = int(router.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def get_raw(router: Router, target: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *extra]
    return raw(router, ("\r\n".join(lines) + "\r\n\r\n").encode())
