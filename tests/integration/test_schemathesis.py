"""The served OpenAPI document, property-tested: schemathesis generates requests from
`GET /api/v1/openapi.json` (valid ones and ones the document says are invalid) and runs every check
it has against a router whose only upstream is the fast fake. Any finding fails the test: a
status, header or body the document does not describe, a valid request refused, an invalid one
accepted, a 5xx, a 405 without `Allow`, a deleted key still there.

Bounded (examples per operation, a wall-clock limit), seeded, and offline: the router, the fake
upstream and schemathesis talk on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, SMOLLM2_TEMPLATE, Router, start_router, stop

EXAMPLES = 25  # per operation and phase
SEED = 20260
WALL_CLOCK_SECONDS = 100
OWN_KEY_NAME = "schemathesis"


def config(fake: str) -> str:
    # `ok` answers at once with one choice, whatever was asked: the router fans `n` and batches
    # of prompts out to it, as to any upstream that lacks them. A chat request reaches it through
    # a chat template; it has no tools.
    return f"""default_model: fake/ok
providers:
  fake:
    kind: openai
    base_url: {fake}/v1
    timeouts: {{connect: 1, first_token: 5, idle: 5, total: 10}}
    unsupported_parameters: [n, prompt_batch]
    max_logprobs: 5
    tokenizer: vllm  # the fake's /tokenize and /detokenize, for the tokenizer endpoints
    response_formats: [text, json_object, json_schema, grammar]
models:
  - id: fake/ok
    deployments:
      - {{provider: fake, model: ok, chat_template: {json.dumps(SMOLLM2_TEMPLATE)}}}
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Router]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    r = start_router(tmp, config(fake_upstream), create_key=False)
    created = r.cli("keys", "create", "--name", OWN_KEY_NAME, "--admin")
    r.key = created.stdout.strip().splitlines()[-1]
    try:
        yield r
    finally:
        stop(r.proc)


def test_the_served_document_holds_for_every_generated_request(router: Router, tmp_path: Path) -> None:
    key_id = router.key.removeprefix("lr-").split("_", 1)[0]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
        "LLMROUTER_SCHEMATHESIS_KEY": f"{key_id},{OWN_KEY_NAME}",
    }
    run = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "run",
            f"{router.api}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {router.key}",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--request-timeout",
            "15",
            "--generation-database",
            "none",
            "--continue-on-failure",
            "--no-color",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WALL_CLOCK_SECONDS,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
