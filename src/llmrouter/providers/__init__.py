"""Provider kinds: each config `kind` (its settings Struct) and the adapter that serves it.

A new kind is its settings Struct in `settings.py` (a subclass of `HttpProvider` for an HTTP
upstream), its adapter in a file of its own here, and one line below. Adapters are imported only
when a provider of their kind is configured.
"""

from __future__ import annotations

import importlib
from typing import Any

from llmrouter.providers.base import Provider
from llmrouter.settings import (
    AnthropicProvider,
    CheckSettings,
    DeploymentSettings,
    GeminiProvider,
    LlamaCppProvider,
    OpenAIChatProvider,
    OpenAIProvider,
)

__all__ = ["KINDS", "build_provider"]

KINDS: dict[type[Any], str] = {
    OpenAIProvider: "llmrouter.providers.openai:OpenAIAdapter",
    OpenAIChatProvider: "llmrouter.providers.openai_chat:OpenAIChatAdapter",
    AnthropicProvider: "llmrouter.providers.anthropic:AnthropicAdapter",
    GeminiProvider: "llmrouter.providers.gemini:GeminiAdapter",
    LlamaCppProvider: "llmrouter.providers.llamacpp:LlamaCppAdapter",
}


def build_provider(
    name: str, settings: Any, deployments: list[DeploymentSettings], checks: CheckSettings
) -> Provider:
    """The adapter of provider `name`, as its kind says."""
    module, _, cls = KINDS[type(settings)].partition(":")
    adapter: Provider = getattr(importlib.import_module(module), cls)(
        name, settings, deployments, checks
    )
    return adapter
