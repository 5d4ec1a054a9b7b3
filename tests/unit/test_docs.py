"""The configurations shown in the README and config/example.yaml load as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmrouter.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"readme-{i}" for i in range(len(BLOCKS))])
def test_readme_configs_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: str) -> None:
    for name in ("OPENAI_API_KEY", "AZURE_URL", "AZURE_KEY"):
        monkeypatch.setenv(name, "http://example.invalid/v1" if name.endswith("URL") else "k")
    path = tmp_path / "c.yaml"
    path.write_text(block)
    assert load_settings(path).models


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    settings = load_settings(ROOT / "config" / "example.yaml")
    assert {"openai", "vllm", "ollama", "local"} <= set(settings.providers)


def test_there_are_readme_configs() -> None:
    assert len(BLOCKS) >= 2
