"""Re-reading the config file without a restart: SIGHUP, or `POST /api/v1/admin/reload`.

What the config decides -- models and their deployments, providers and their keys, strategies and
routing, the JWT issuers' policies -- is held by one `Context`, which a reload replaces whole for
new requests; a request keeps the Context it started on to its end, streams included
(`App._http`). The process's own parts (the store, keys, ledger, limiter, health book, and any
other field a Context carries) pass from the old Context to the new one as they are.

A provider whose settings and deployments are unchanged is the same object in the new Context: its
connections stay warm and a local model stays loaded, once. One that is new or changed is built and
started (its local models loaded) before the swap, so a reload that cannot start it is refused and
the running config stays; the one it replaces is closed when every request that started before the
swap has finished, or after the longest a request may run. A file that does not load, or that
changes what only a restart can (`RESTART_ONLY`), is refused with its one-line error, and nothing
changes.

With `--workers N` the supervisor passes SIGHUP on to every worker (server.py), and each reloads
itself; a POST landing on a worker checks the file there, then signals the supervisor, whose pid
the workers find in `SUPERVISOR_PID`.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import os
import random
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from msgspec import Struct

from llmrouter.accounts.auth import Authenticator
from llmrouter.errors import ServiceUnavailable
from llmrouter.providers import build_provider
from llmrouter.providers.base import Provider
from llmrouter.routing.executor import Executor
from llmrouter.routing.plan import Catalog
from llmrouter.server import SUPERVISOR_PID
from llmrouter.settings import ConfigError, DeploymentSettings, Settings, load_settings

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = [
    "RESTART_ONLY",
    "Changes",
    "InFlight",
    "Reloader",
    "changes",
    "check_restart_only",
]

log = logging.getLogger("llmrouter")

# What the process builds once, from the config as it was at start: changing one needs a restart.
RESTART_ONLY = (
    "home",  # the store's folder
    # The socket and the HTTP protocol of every connection (server.py, api/protocol.py).
    "server.host",
    "server.port",
    "server.workers",
    "server.max_header_bytes",
    "server.client_timeouts",
    "server.access_log",
    "routing.deadline_seconds",  # the limiter's concurrency leases are made to outlast it
    # The store, the key cache, the ledger and the limiter.
    "accounts.database_url",
    "accounts.database_schema",
    "accounts.key_cache_seconds",
    "accounts.redis_url",
    "accounts.redis_namespace",
    "accounts.rate_limits_fail_open",
    "accounts.credits_fail_open",
    "accounts.ledger_batch_max",
    "accounts.ledger_sync",
    "accounts.ledger_wait_seconds",
    # The metrics endpoint and the exporter of traces are set up at start; so is the dashboard
    # (its route, its login limiter).
    "metrics",
    "tracing",
    "dashboard",
)

# How long a new local model may take to load before the reload is refused.
_LOAD_SECONDS = 600.0
# Beyond a request's deadline, before what a retired config used is closed anyway: the slack the
# limiter's leases give a request too (app.py).
_GRACE_SECONDS = 60.0


class InFlight:
    """The requests a Context is serving; a retired Context is waited on until there are none."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if not self.count and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no request is in flight (a retired Context gets no new ones)."""
        if self.count:
            self._idle = asyncio.Event()
            await self._idle.wait()


class ModelChanges(Struct, frozen=True):
    added: list[str]
    removed: list[str]
    changed: list[str]


class ProviderChanges(Struct, frozen=True):
    rebuilt: list[str]  # new, or their settings or deployments changed: built and started anew
    removed: list[str]


class Changes(Struct, frozen=True):
    """What a reload changes, as the POST answers it and the log line says it."""

    # reloaded: swapped in here; unchanged: the file says what runs already; signalled: checked
    # here, and every worker reloads itself on the supervisor's signal.
    status: str
    models: ModelChanges
    providers: ProviderChanges
    settings: list[str]  # the other sections that changed (routing, accounts...)

    def describe(self) -> str:
        m, p = self.models, self.providers
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("models added:", m.added),
                ("models removed:", m.removed),
                ("models changed:", m.changed),
                ("providers rebuilt:", p.rebuilt),
                ("providers removed:", p.removed),
                ("settings changed:", self.settings),
            )
            if names
        ]
        return "; ".join(parts) or "nothing changed"


def _get(settings: Settings, path: str) -> Any:
    value: Any = settings
    for name in path.split("."):
        value = getattr(value, name)
    return value


def check_restart_only(running: Settings, new: Settings, file: str) -> None:
    """ConfigError naming every field `new` changes that needs a restart."""
    changed = [path for path in RESTART_ONLY if _get(running, path) != _get(new, path)]
    if changed:
        raise ConfigError(
            f"{file}: {', '.join(changed)} cannot change without a restart; nothing was reloaded"
        )


def _deployments(settings: Settings, provider: str) -> list[DeploymentSettings]:
    return [d for m in settings.models for d in m.deployments if d.provider == provider]


def _same_provider(running: Settings, new: Settings, name: str) -> bool:
    """Would `new` build provider `name` as `running` did? (An adapter is made of its settings,
    its deployments in any order, as far as it reads them, and the check limits.)"""
    if name not in running.providers or running.providers[name] != new.providers[name]:
        return False
    if running.checks != new.checks:
        return False
    old = [_as_adapted(d) for d in _deployments(running, name)]
    now = [_as_adapted(d) for d in _deployments(new, name)]
    return all(d in now for d in old) and all(d in old for d in now)


def _as_adapted(deployment: DeploymentSettings) -> DeploymentSettings:
    """A deployment as its adapter sees it: how it is chosen (weight, priority) and priced is
    the router's business, so a change there keeps the adapter (and a local model loaded once).
    Adapters look their deployments up by model name, never by the whole settings."""
    return msgspec.structs.replace(deployment, weight=1.0, priority=0, pricing=None)


def changes(running: Settings, new: Settings, status: str) -> Changes:
    old_models = {m.id: m for m in running.models}
    new_models = {m.id: m for m in new.models}
    sections = [
        name
        for name in Settings.__struct_fields__
        if name not in ("models", "providers") and getattr(running, name) != getattr(new, name)
    ]
    return Changes(
        status=status,
        models=ModelChanges(
            added=sorted(new_models.keys() - old_models.keys()),
            removed=sorted(old_models.keys() - new_models.keys()),
            changed=sorted(
                m for m in new_models.keys() & old_models.keys() if new_models[m] != old_models[m]
            ),
        ),
        providers=ProviderChanges(
            rebuilt=sorted(p for p in new.providers if not _same_provider(running, new, p)),
            removed=sorted(running.providers.keys() - new.providers.keys()),
        ),
        settings=sections,
    )


class _Holder(Protocol):
    ctx: Context


class Reloader:
    """Reloads one process's config, one reload at a time, and closes what the retired configs
    used once nothing needs it."""

    def __init__(self, app: _Holder, path: str | None) -> None:
        self._app = app
        self._path = path
        self._lock = asyncio.Lock()
        self._retired: list[Context] = []  # swapped out, with requests still in flight
        self._tasks: set[asyncio.Task[Any]] = set()
        supervisor = os.environ.get(SUPERVISOR_PID)
        self._supervisor = int(supervisor) if supervisor else None

    # -- the signal ---------------------------------------------------------------------------

    def install(self) -> None:
        """SIGHUP reloads, from now on (in the server's event loop, at start). Until then it is
        ignored (`cmd_serve` ignores it first, and workers inherit that), never fatal; without a
        file, a SIGHUP says there is nothing to reload."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_signal)

    def _on_signal(self) -> None:
        self._spawn(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass  # `reload` has logged it
        except Exception:
            log.exception("config not reloaded: internal error")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reloading ----------------------------------------------------------------------------

    async def request(self) -> Changes:
        """The admin's POST: reload here, or with workers check the file here and have the
        supervisor signal every worker. ConfigError: refused, nothing changed."""
        if self._supervisor is None:
            return await self.reload()
        async with self._lock:
            running = self._app.ctx.settings
            new = self._read(running)
        # Only our own supervisor: if it died, its pid may be another process's by now.
        if os.getppid() != self._supervisor:
            raise ServiceUnavailable(
                "This worker's supervisor is gone: the other workers cannot be told to reload. "
                "Restart the server."
            )
        os.kill(self._supervisor, signal.SIGHUP)
        return changes(running, new, "signalled")

    async def reload(self) -> Changes:
        """Read the file and swap its config in. ConfigError (logged): refused, nothing changed."""
        async with self._lock:
            try:
                old = self._app.ctx
                settings = self._read(old.settings)
                if settings == old.settings:
                    log.info("config reloaded from %s: nothing changed", self._path)
                    return changes(old.settings, settings, "unchanged")
                summary = changes(old.settings, settings, "reloaded")
                new = await self._build(old, settings)
            except ConfigError as exc:
                log.error("config not reloaded: %s", exc)
                raise
            self._swap(old, new)
        log.info(
            "config reloaded from %s: %s",
            self._path,
            summary.describe(),
            extra={"fields": {"reload": msgspec.to_builtins(summary)}},
        )
        return summary

    def _read(self, running: Settings) -> Settings:
        if self._path is None:
            raise ConfigError(
                "this router was started without a config file (the embedded default): there is "
                "nothing to reload"
            )
        settings = load_settings(self._path)
        check_restart_only(running, settings, self._path)
        return settings

    async def _build(self, old: Context, settings: Settings) -> Context:
        """A Context for `settings`: the old one's process-lifetime parts, its providers where they
        are unchanged, new ones built and started."""
        from llmrouter.app import jwt_authenticator  # (app.py imports this module)

        providers: dict[str, Provider] = {}
        started: list[Provider] = []
        try:
            for name, provider_settings in settings.providers.items():
                if _same_provider(old.settings, settings, name):
                    providers[name] = old.catalog.providers[name]
                    continue
                try:
                    provider = build_provider(
                        name, provider_settings, _deployments(settings, name), settings.checks
                    )
                    started.append(provider)
                    providers[name] = provider
                    await provider.start()
                except ConfigError:
                    raise
                except Exception as exc:  # a foreign error from a provider's pool or engine
                    raise ConfigError(
                        f"provider {name!r} did not start: {type(exc).__name__}: {exc}; "
                        "nothing was reloaded"
                    ) from None
            await _loaded(started, settings)
            jwt = jwt_authenticator(settings)
            routing = settings.routing
            rng = random.Random(routing.seed)  # noqa: S311 - load spreading and jitter
            catalog = Catalog(settings, providers, old.health, rng)
        except BaseException:
            for provider in started:
                await provider.aclose()
            raise
        new = copy.copy(old)
        new.settings = settings
        new.catalog = catalog
        # The executor holds the retry budget's account: kept while its settings are.
        if routing != old.settings.routing:
            new.executor = Executor(routing, old.health, rng)
        new.auth = Authenticator(old.keys, jwt)
        new.in_flight = InFlight()
        return new

    def _swap(self, old: Context, new: Context) -> None:
        routing = new.settings.routing
        if (routing.health, routing.latency_ewma_alpha) != (
            old.settings.routing.health,
            old.settings.routing.latency_ewma_alpha,
        ):
            # What the book knows of each deployment stays; the new thresholds apply from now.
            new.health.configure(routing.health, alpha=routing.latency_ewma_alpha)
        self._app.ctx = new
        self._retired.append(old)
        self._spawn(self._retire(old))

    async def _retire(self, old: Context) -> None:
        grace = old.settings.routing.deadline_seconds + _GRACE_SECONDS
        try:
            async with asyncio.timeout(grace):
                await old.in_flight.drained()
        except TimeoutError:
            log.warning(
                "%d requests on the config before the reload are still running after %.0f s; "
                "closing what it used",
                old.in_flight.count,
                grace,
            )
        self._retired.remove(old)
        if await self._close_unused(old):
            # What the process had at start was frozen out of the cyclic collector (app.py): a
            # closed provider (a local model's memory) caught in a cycle would never be freed.
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    async def _close_unused(self, old: Context) -> bool:
        """Close what `old` used that no live Context uses; whether any provider was closed."""
        live = [self._app.ctx, *self._retired]
        used = {id(p) for ctx in live for p in ctx.catalog.providers.values()}
        closed = False
        for provider in old.catalog.providers.values():
            if id(provider) not in used:
                used.add(id(provider))
                await provider.aclose()
                closed = True
        old.catalog.checks.close()
        return closed

    async def aclose(self) -> None:
        """At shutdown, before the Context closes: stop listening, and close what the retired
        configs still hold (the current one's providers are the Context's to close)."""
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # while the ledger flushes: never fatal
        for task in list(self._tasks):
            task.cancel()
        for old in list(self._retired):
            self._retired.remove(old)
            await self._close_unused(old)


async def _loaded(providers: list[Provider], settings: Settings) -> None:
    """Wait until the new providers' deployments would answer (a local model has loaded);
    ConfigError if one cannot."""
    waiting = [(p, d) for p in providers for d in _deployments(settings, p.name)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LOAD_SECONDS
    while waiting:
        for provider, deployment in waiting:
            if not provider.usable(deployment):
                raise ConfigError(
                    f"deployment {provider.name}/{deployment.model} did not start (the log says "
                    "why); nothing was reloaded"
                )
        waiting = [(p, d) for p, d in waiting if not p.ready(d)]
        if waiting and loop.time() > deadline:
            provider, deployment = waiting[0]
            raise ConfigError(
                f"deployment {provider.name}/{deployment.model} did not load within "
                f"{_LOAD_SECONDS:.0f} s; nothing was reloaded"
            )
        if waiting:
            await asyncio.sleep(0.05)
