"""The configurations shown in the README and config/example.yaml load as they are."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from llmrouter.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


MINIMAL = """providers: {local: {kind: llamacpp}}
models: [{id: local/smollm2-135m-instruct, deployments: [{provider: local, model: x}]}]
"""


@pytest.mark.parametrize("block", BLOCKS, ids=[f"readme-{i}" for i in range(len(BLOCKS))])
def test_readme_configs_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: str) -> None:
    for name in (
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "AZURE_URL",
        "AZURE_KEY",
        "PGPASSWORD",
        "OTLP_KEY",
    ):
        monkeypatch.setenv(name, "http://example.invalid/v1" if name.endswith("URL") else "k")
    block = textwrap.dedent(block)  # blocks inside list items are indented
    if not re.search(r"^models:", block, re.M):  # a fragment: checked inside a minimal config
        block += MINIMAL
    path = tmp_path / "c.yaml"
    path.write_text(block)
    assert load_settings(path).models


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    settings = load_settings(ROOT / "config" / "example.yaml")
    assert {"openai", "openai_chat", "anthropic", "gemini", "vllm", "ollama", "local"} <= set(
        settings.providers
    )


def test_deploy_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("DATABASE_URL", "postgresql://db/x"),
        ("REDIS_URL", "redis://r"),
        ("OPENAI_API_KEY", "k"),
    ):
        monkeypatch.setenv(name, value)
    accounts = load_settings(ROOT / "deploy" / "config.yaml").accounts
    assert accounts.database_url == "postgresql://db/x" and accounts.redis_url == "redis://r"


def test_there_are_readme_configs() -> None:
    assert len(BLOCKS) >= 2


PARAMETERS_DOC = (ROOT / "docs" / "parameters.md").read_text()


def test_the_parameter_table_is_the_conformance_matrix() -> None:
    from tests.integration.test_conformance import COLUMNS, ROWS

    table = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in PARAMETERS_DOC.splitlines()
        if line.startswith("| ")
    ]
    assert table[0] == ["parameter", *COLUMNS]
    assert table[1:] == [[row.name, *row.cells] for row in ROWS]


def test_the_parameter_docs_provider_configs_load() -> None:
    import msgspec
    import yaml

    from llmrouter.settings import ProviderSettings

    blocks = re.findall(r"```yaml\n(.*?)```", PARAMETERS_DOC, re.S)
    assert len(blocks) == 3
    for block in blocks:
        loaded = yaml.safe_load(block)
        providers = loaded.get("providers", loaded)
        for body in providers.values():
            msgspec.convert(body, ProviderSettings)  # type: ignore[arg-type]


def test_every_request_field_of_the_spec_has_a_row() -> None:
    from llmrouter.openapi import shared_spec
    from tests.integration.test_conformance import ROWS

    fields = shared_spec()["components"]["schemas"]["CompletionCreateParams"]["properties"]
    named = " ".join(row.name for row in ROWS)
    missing = [name for name in fields if not re.search(rf"\b{name}\b", named)]
    assert not missing


CHAT_PARAMETERS_DOC = (ROOT / "docs" / "chat-parameters.md").read_text()


def test_the_chat_parameter_table_is_the_chat_conformance_matrix() -> None:
    from tests.integration.test_chat_conformance import COLUMNS, ROWS

    section = CHAT_PARAMETERS_DOC.split("## The table", 1)[1].split("\n## ", 1)[0]
    table = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ")
    ]
    assert table[0] == ["parameter", *COLUMNS]
    assert table[1:] == [[row.name, *row.cells] for row in ROWS]


def test_every_chat_request_field_has_a_row() -> None:
    from llmrouter.wire.chat import ChatCompletionCreateParams
    from tests.integration.test_chat_conformance import ROWS

    named = " ".join(row.name for row in ROWS)
    missing = [
        f for f in ChatCompletionCreateParams.__struct_fields__ if not re.search(rf"\b{f}\b", named)
    ]
    assert not missing
