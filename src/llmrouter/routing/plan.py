"""From a request to a plan: which deployments may answer it, in what order.

The request's `model` comes first, then `models` in order (OpenRouter's semantics). A deployment is
in the plan only if it honours every parameter the request sets; if no deployment of any requested
model does, the request is refused with a 400 naming the parameter and the model — never a silent
drop.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from msgspec import UNSET

from llmrouter.errors import InvalidRequest, ModelNotFound, UnsupportedParameter
from llmrouter.providers.base import Capabilities, Provider
from llmrouter.routing.health import HealthBook
from llmrouter.routing.strategies import order_targets
from llmrouter.settings import DeploymentSettings, ModelSettings, Settings
from llmrouter.wire.completions import CompletionCreateParams, ProviderPreferences
from llmrouter.wire.validate import Prompts

__all__ = ["Catalog", "Plan", "Target", "requested_parameters"]


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment of one model, and the adapter that reaches it."""

    model: ModelSettings
    deployment: DeploymentSettings
    provider: Provider
    capabilities: Capabilities

    @property
    def label(self) -> str:
        return f"{self.deployment.provider}/{self.deployment.model}"


@dataclass(frozen=True, slots=True)
class Plan:
    targets: tuple[Target, ...]


class Catalog:
    """The configured models, each with its deployments bound to provider adapters."""

    def __init__(
        self,
        settings: Settings,
        providers: dict[str, Provider],
        health: HealthBook,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.health = health
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not secrets
        self.default_model = settings.default_model or settings.models[0].id
        self.models: dict[str, ModelSettings] = {}
        self.targets: dict[str, tuple[Target, ...]] = {}
        for model in settings.models:
            targets = tuple(
                Target(model, d, providers[d.provider], providers[d.provider].capabilities(d))
                for d in model.deployments
            )
            for name in (model.id, *model.aliases):
                self.models[name] = model
                self.targets[name] = targets

    def all_targets(self) -> Iterator[Target]:
        for model in self.settings.models:
            yield from self.targets[model.id]

    def context_length(self, model: ModelSettings) -> int | None:
        if model.context_length is not None:
            return model.context_length
        lengths = [
            n
            for t in self.targets[model.id]
            if (n := getattr(t.provider, "context_length", lambda _d: None)(t.deployment))
        ]
        return min(lengths) if lengths else None

    def plan(self, params: CompletionCreateParams, prompts: Prompts) -> Plan:
        names = self._requested_models(params)
        wanted = requested_parameters(params, prompts)
        prefs = params.provider or ProviderPreferences()
        self._check_provider_names(prefs)
        targets: list[Target] = []
        refusal: UnsupportedParameter | None = None
        for name, _param in names:
            capable: list[Target] = []
            for target in self._allowed(self.targets[name], prefs):
                missing = _first_unsupported(target.capabilities, params, wanted)
                if missing is None:
                    capable.append(target)
                elif refusal is None:
                    param, why = missing
                    refusal = UnsupportedParameter(
                        f"Model {target.model.id!r} (deployment {target.label}) {why}; llmrouter "
                        "does not drop parameters.",
                        param=param,
                    )
            model = self.models[name]
            ordered = order_targets(prefs.sort or model.strategy, capable, self.health, self._rng)
            targets.extend(_apply_order(ordered, prefs))
        if not targets:
            if refusal is None:
                raise InvalidRequest(
                    "The `provider` preferences leave no deployment of the requested models.",
                    param="provider",
                )
            raise refusal
        return Plan(tuple(targets))

    @staticmethod
    def _allowed(targets: tuple[Target, ...], prefs: ProviderPreferences) -> list[Target]:
        return [
            t
            for t in targets
            if (prefs.only is None or t.deployment.provider in prefs.only)
            and (prefs.ignore is None or t.deployment.provider not in prefs.ignore)
        ]

    def _check_provider_names(self, prefs: ProviderPreferences) -> None:
        for field in ("order", "only", "ignore"):
            for i, name in enumerate(getattr(prefs, field) or ()):
                if name not in self.settings.providers:
                    known = ", ".join(sorted(self.settings.providers))
                    raise InvalidRequest(
                        f"No provider named {name!r} (this router has: {known}).",
                        param=f"provider.{field}[{i}]",
                    )

    def _requested_models(self, params: CompletionCreateParams) -> list[tuple[str, str]]:
        names: list[tuple[str, str]] = []
        if params.model is not UNSET:
            names.append((params.model, "model"))
        if params.models is not UNSET:
            names.extend((m, f"models[{i}]") for i, m in enumerate(params.models))
        if not names:
            names.append((self.default_model, "model"))
        seen: set[str] = set()
        unique: list[tuple[str, str]] = []
        for name, param in names:
            if name not in self.models:
                raise ModelNotFound(
                    f"The model {name!r} does not exist on this router; GET /api/v1/models lists "
                    "the models it serves.",
                    param=param,
                )
            canonical = self.models[name].id
            if canonical not in seen:
                seen.add(canonical)
                unique.append((name, param))
        return unique


def _apply_order(targets: list[Target], prefs: ProviderPreferences) -> list[Target]:
    """`provider.order` first, in its order; without fallbacks, nothing else."""
    if prefs.order:
        rank = {name: i for i, name in enumerate(prefs.order)}
        listed = sorted(
            (t for t in targets if t.deployment.provider in rank),
            key=lambda t: rank[t.deployment.provider],
        )
        if prefs.allow_fallbacks is False:
            return listed
        return listed + [t for t in targets if t.deployment.provider not in rank]
    if prefs.allow_fallbacks is False:
        return targets[:1]
    return targets


def requested_parameters(params: CompletionCreateParams, prompts: Prompts) -> list[str]:
    """The parameters this request actually asks something of (neutral values ask nothing)."""
    p = params
    wanted: list[str] = []
    if p.echo:
        wanted.append("echo")
    if p.n is not None and p.n > 1:
        wanted.append("n")
    if p.best_of is not None and p.best_of > (p.n or 1):
        wanted.append("best_of")
    if p.logprobs is not None:
        wanted.append("logprobs")
    if p.logit_bias:
        wanted.append("logit_bias")
    if p.seed is not None:
        wanted.append("seed")
    if p.stop:
        wanted.append("stop")
    if p.suffix is not None:
        wanted.append("suffix")
    for name in ("temperature", "top_p"):
        if getattr(p, name) is not None:
            wanted.append(name)
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(p, name):
            wanted.append(name)
    if p.stream:
        wanted.append("stream")
        if p.stream_options is not None and p.stream_options.include_usage:
            wanted.append("stream_options")
    if p.response_format is not None and type(p.response_format).__name__ != "ResponseFormatText":
        wanted.append("response_format")
    if prompts and not isinstance(prompts[0], str):
        wanted.append("prompt")
    return wanted


def _first_unsupported(
    caps: Capabilities, params: CompletionCreateParams, wanted: list[str]
) -> tuple[str, str] | None:
    """The first parameter `caps` cannot honour, and why; None if it honours them all."""
    for name in wanted:
        if name == "prompt":
            if not caps.token_prompts:
                return "prompt", "does not accept token-id prompts"
        elif name == "response_format":
            kind = params.response_format.__struct_config__.tag  # type: ignore[union-attr]
            if kind not in caps.response_formats:
                return "response_format", f"cannot honour response_format {kind!r}"
        elif name == "best_of":
            if not caps.best_of_above_n:
                return "best_of", "cannot honour `best_of` greater than `n`"
        elif name == "stream_options":
            if not caps.stream_usage:
                return "stream_options", "does not report usage in streams"
        elif name not in caps.parameters:
            return name, f"cannot honour `{name}`"
    if params.logprobs is not None and params.logprobs > caps.max_logprobs:
        return "logprobs", f"returns at most {caps.max_logprobs} logprobs per token"
    return None
