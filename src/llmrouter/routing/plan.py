"""From a request to a plan: which deployments may answer it, in what order, and how.

The request's `model` comes first, then `models` in order (OpenRouter's semantics). A deployment is
in the plan only if it honours every parameter the request sets, natively or with the router's
exact emulation (its `Shape`, see `llmrouter.emulation`); if no deployment of any requested model
can, the request is refused with a 400 naming the parameter and the model — never a silent drop.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmrouter.emulation.shape import Shape, requested_parameters, shape_for
from llmrouter.errors import (
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ServiceUnavailable,
    UnsupportedParameter,
    quoted,
)
from llmrouter.generation import Generation, Route
from llmrouter.providers.base import Capabilities, Provider, Tokenizer
from llmrouter.routing.health import HealthBook
from llmrouter.routing.strategies import order_targets
from llmrouter.settings import DeploymentSettings, ModelSettings, Pricing, Settings
from llmrouter.structured import Checker, Checks
from llmrouter.wire.completions import ProviderPreferences

__all__ = ["Catalog", "Plan", "Target"]


_NO_PREFERENCES = ProviderPreferences()  # (read only)


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment of one model, the adapter that reaches it, and (in a plan) how it is made
    to honour the request."""

    model: ModelSettings
    deployment: DeploymentSettings
    provider: Provider
    capabilities: Capabilities
    shape: Shape | None = None

    label: str = field(init=False)  # "provider/model", what health and logs know it by

    def __post_init__(self) -> None:
        label = f"{self.deployment.provider}/{self.deployment.model}"
        object.__setattr__(self, "label", label)

    def shaped(self, shape: Shape) -> Target:
        """This target with the shape of a plan's request (`dataclasses.replace`, without the
        generic field walk that costs several µs a request)."""
        return Target(self.model, self.deployment, self.provider, self.capabilities, shape)

    @property
    def pricing(self) -> Pricing:
        return self.deployment.pricing or self.model.pricing

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What an answer of this size costs here, in the configured currency."""
        pricing = self.pricing
        return (prompt_tokens * pricing.prompt + completion_tokens * pricing.completion) / 1e6


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
        self.checks = Checks(settings.checks)
        self.default_model = settings.default_model or settings.models[0].id
        self.models: dict[str, ModelSettings] = {}
        self.targets: dict[str, tuple[Target, ...]] = {}
        # A deployment's label ("provider/upstream model") to its provider and upstream model.
        self.deployment_labels: dict[str, tuple[str, str]] = {}
        for model in settings.models:
            targets = tuple(
                Target(model, d, providers[d.provider], providers[d.provider].capabilities(d))
                for d in model.deployments
            )
            for name in (model.id, *model.aliases):
                self.models[name] = model
                self.targets[name] = targets
            for t in targets:
                self.deployment_labels[t.label] = (t.deployment.provider, t.deployment.model)

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

    def _named(self, route: Route) -> list[str]:
        names = [route.model] if route.model is not None else []
        return [*names, *route.models] or [self.default_model]

    def dearest_cost(self, route: Route, prompt_tokens: int, completion_tokens: int) -> float:
        """The most a request of this size could cost at any deployment of the models it names
        (names that match no model cost nothing: the request will be refused)."""
        return max(
            (
                target.cost(prompt_tokens, completion_tokens)
                for name in self._named(route)
                for target in self.targets.get(name, ())
            ),
            default=0.0,
        )

    def longest_context(self, route: Route) -> int | None:
        """The longest known context of the models a request names, if any is known."""
        lengths = [n for name in self._named(route) if (n := self.context_length_of(name))]
        return max(lengths, default=None)

    def context_length_of(self, name: str) -> int | None:
        """The context length of the model called `name`, if there is one and it is known."""
        model = self.models.get(name)
        return None if model is None else self.context_length(model)

    def plan(self, route: Route, request: Generation, checker: Checker | None) -> Plan:
        """`checker` is the check of the request's `response_format` (`self.checks.admit`)."""
        names = self._requested_models(route)
        wanted = requested_parameters(request)
        prefs = route.provider or _NO_PREFERENCES
        if route.provider is not None:
            self._check_provider_names(prefs)
        targets: list[Target] = []
        refusal: UnsupportedParameter | None = None
        for name, _param in names:
            capable: list[Target] = []
            for target in self._allowed(self.targets[name], prefs):
                shape = shape_for(target.capabilities, target.model, request, wanted, checker)
                if isinstance(shape, Shape):
                    capable.append(target.shaped(shape))
                elif refusal is None:
                    param, why = shape
                    refusal = UnsupportedParameter(
                        f"Model {target.model.id!r} (deployment {target.label}) {why}; llmrouter "
                        "does not drop parameters.",
                        param=param,
                    )
            model = self.models[name]
            strategy = prefs.sort or model.strategy
            ordered = order_targets(strategy, capable, self.health, self._rng, request.prompts)
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

    def check_allowed(self, route: Route, allowed: frozenset[str] | None) -> None:
        """A principal limited to some models (ids or aliases) may ask for those only."""
        for name, param in self._requested_models(route):
            self._check_permitted(name, param, allowed)

    def _check_permitted(self, name: str, param: str, allowed: frozenset[str] | None) -> None:
        if allowed is None:
            return
        permitted = {self.models[m].id if m in self.models else m for m in allowed}
        if self.models[name].id not in permitted:
            refused = PermissionDenied(
                f"This key or token may not use the model {quoted(name)}.",
                param=param,
                code="model_not_allowed",
            )
            refused.limit = "models"
            raise refused

    def tokenizers(
        self, name: str | None, allowed: frozenset[str] | None, *, info: bool = False
    ) -> list[tuple[Target, Tokenizer]]:
        """The deployments of the model called `name` (None: the default model) whose tokenizer
        the router reaches (and, with `info`, can describe), in the model's order, ejected ones
        last."""
        name = self.default_model if name is None else name
        if name not in self.models:
            raise ModelNotFound(
                f"The model {quoted(name)} does not exist on this router; GET /api/v1/models lists "
                "the models it serves.",
                param="model",
            )
        self._check_permitted(name, "model", allowed)
        found = [
            (t, tokenizer)
            for t in self.targets[name]
            if (tokenizer := t.provider.tokenizer(t.deployment)) is not None
            and (tokenizer.has_info or not info)
        ]
        if not found:
            what = "/tokenizer_info serves local models and vLLM upstreams (`tokenizer: vllm`)"
            if not info:
                what = (
                    "/tokenize serves local models, and upstreams whose provider declares one "
                    "(`tokenizer: vllm` or `llama.cpp`)"
                )
            raise InvalidRequest(
                f"The model {quoted(name)} has no tokenizer llmrouter can reach: {what}.",
                param="model",
            )
        usable = [(t, tokenizer) for t, tokenizer in found if t.provider.usable(t.deployment)]
        if not usable:
            raise ServiceUnavailable(
                f"No deployment of the model {quoted(name)} with a tokenizer is usable now.",
                retry_after=1,
            )
        usable.sort(key=lambda tt: not self.health.available(tt[0].label))
        return usable

    def _check_provider_names(self, prefs: ProviderPreferences) -> None:
        for kind in ("order", "only", "ignore"):
            for i, name in enumerate(getattr(prefs, kind) or ()):
                if name not in self.settings.providers:
                    known = ", ".join(sorted(self.settings.providers))
                    raise InvalidRequest(
                        f"No provider named {quoted(name)} (this router has: {known}).",
                        param=f"provider.{kind}[{i}]",
                    )

    def _requested_models(self, route: Route) -> list[tuple[str, str]]:
        names: list[tuple[str, str]] = []
        if route.model is not None:
            names.append((route.model, "model"))
        names.extend((m, f"models[{i}]") for i, m in enumerate(route.models))
        if not names:
            names.append((self.default_model, "model"))
        seen: set[str] = set()
        unique: list[tuple[str, str]] = []
        for name, param in names:
            if name not in self.models:
                raise ModelNotFound(
                    f"The model {quoted(name)} does not exist on this router; GET /api/v1/models lists "
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
