from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from llmrouter.providers._grammar import MAX_DEPTH, MAX_RULES
from llmrouter.settings import CheckSettings, ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_env_interpolation_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-1")
    settings = load_settings(
        write(
            tmp_path,
            "providers:\n"
            "  o: {kind: openai, base_url: '${URL:-http://h/v1}', api_key: ${UPSTREAM_KEY}}\n"
            "models:\n  - {id: m, deployments: [{provider: o, model: x}]}\n",
        )
    )
    provider = settings.providers["o"]
    assert provider.base_url == "http://h/v1" and provider.api_key == "sk-1"  # type: ignore[union-attr]


ONE_MODEL = "models:\n  - {id: m, deployments: [{provider: o, model: x}]}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("providers: {o: {kind: carrier-pigeon}}\nmodels: []\n", "providers.o"),
        (
            "providers: {o: {kind: openai, base_url: ftp://x}}\n" + ONE_MODEL,
            "providers.o.base_url (line 1)",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'https://user:secret@x/v1'}}\n" + ONE_MODEL,
            "providers.o.base_url (line 1)",  # (credentials go in api_key or headers)
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x'}}\n"
            + ONE_MODEL
            + "  - {id: m, deployments: [{provider: o, model: y}]}\n",
            "used twice",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x'}}\ndefault_model: z\nmodels:\n"
            "  - {id: m, deployments: [{provider: o, model: x}]}\n",
            "default_model",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x', timeouts: {total: -1}}}\nmodels:\n"
            "  - {id: m, deployments: [{provider: o, model: x}]}\n",
            "providers.o.timeouts.total",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x'}}\n" + ONE_MODEL + "checks:\n"
            "  schema_depth: 101\n",
            "checks.schema_depth",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x'}}\n" + ONE_MODEL + "checks:\n"
            "  pattern_seconds: 1\n",
            "checks",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x'}}\nmodels:\n"
            "  - {id: m, deployments: [{provider: o, model: x, special_tokens: plain}]}\n",
            "models[0].deployments[0].special_tokens (line 3): applies to llamacpp deployments only",
        ),
        (
            "providers: {o: {kind: openai, base_url: 'http://x', tokenizer: sentencepiece}}\n"
            + ONE_MODEL,
            "providers.o.tokenizer",
        ),
    ],
)
def test_config_errors_name_the_place(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_settings(write(tmp_path, text))
    assert message in str(info.value)


def test_the_checks_maxima_are_the_most_the_grammar_check_takes() -> None:
    info = msgspec.inspect.type_info(CheckSettings)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = {f.name: f.type for f in info.fields}
    assert getattr(fields["grammar_depth"], "le", None) == MAX_DEPTH
    assert getattr(fields["grammar_rules"], "le", None) == MAX_RULES
