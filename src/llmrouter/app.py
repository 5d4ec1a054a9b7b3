"""Builds the ASGI application: routes, the request wrapper, and the lifespan that opens pools.

Every request passes through `App.__call__` top to bottom: request id -> route -> disconnect watch
-> handler -> errors in the spec's shape -> one access-log line.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from llmrouter.accounts.auth import Authenticator
from llmrouter.accounts.journal import Journal
from llmrouter.accounts.keys import Keys
from llmrouter.accounts.ledger import COLUMNS, Ledger
from llmrouter.accounts.limits import Limiter, create_limiter
from llmrouter.accounts.store import Database, StoreError, open_database
from llmrouter.admin.pages import Dashboard
from llmrouter.api.accounts import generation, key_collection, key_item, whoami
from llmrouter.api.admin import reload_config
from llmrouter.api.chat import create_chat_completion
from llmrouter.api.completions import create_completion
from llmrouter.api.http import Receive, Request, Scope, Send, send_bytes
from llmrouter.api.meta import health, metrics, openapi, ready
from llmrouter.api.models import list_models
from llmrouter.api.tokenize import detokenize, tokenize, tokenizer_info
from llmrouter.errors import (
    LlmrouterError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    quoted,
)
from llmrouter.obs import tracing
from llmrouter.obs.logging import access_log, configure_logging
from llmrouter.obs.metrics import Listener, Metrics, start_listener
from llmrouter.openapi import build_openapi
from llmrouter.providers import build_provider
from llmrouter.providers.base import Provider
from llmrouter.reload import InFlight, Reloader
from llmrouter.routing.executor import Executor
from llmrouter.routing.health import HealthBook, LocalHealth
from llmrouter.routing.plan import Catalog
from llmrouter.settings import (
    Settings,
    embedded_default,
    llmrouter_home,
    load_settings,
)
from llmrouter.wire.completions import encoder

if TYPE_CHECKING:
    from llmrouter.accounts.jwt import JwtAuthenticator

__all__ = [
    "App",
    "Context",
    "build_health",
    "build_providers",
    "create_app",
    "create_app_from_environment",
    "jwt_authenticator",
]

log = logging.getLogger("llmrouter")

Handler = Callable[[Request, "Context"], Awaitable[None]]

_ROUTES: dict[str, dict[str, Handler]] = {
    "/api/v1/completions": {"POST": create_completion},
    "/v1/completions": {"POST": create_completion},
    "/api/v1/chat/completions": {"POST": create_chat_completion},
    "/v1/chat/completions": {"POST": create_chat_completion},
    "/api/v1/models": {"GET": list_models},
    "/v1/models": {"GET": list_models},
    "/api/v1/openapi.json": {"GET": openapi},
    "/v1/openapi.json": {"GET": openapi},
    "/api/v1/tokenize": {"POST": tokenize},
    "/v1/tokenize": {"POST": tokenize},
    "/tokenize": {"POST": tokenize},  # where vLLM serves it (and lm-eval's remote tokenizer asks)
    "/api/v1/detokenize": {"POST": detokenize},
    "/v1/detokenize": {"POST": detokenize},
    "/detokenize": {"POST": detokenize},
    "/api/v1/tokenizer_info": {"GET": tokenizer_info},
    "/v1/tokenizer_info": {"GET": tokenizer_info},
    "/tokenizer_info": {"GET": tokenizer_info},
    "/api/v1/key": {"GET": whoami},
    "/api/v1/generation": {"GET": generation},
    "/api/v1/keys": {"GET": key_collection, "POST": key_collection},
    "/api/v1/admin/reload": {"POST": reload_config},
    "/health": {"GET": health},
    "/ready": {"GET": ready},
    "/metrics": {"GET": metrics},
}
# Paths with an id in them: the prefix, the id, then one of the tails (the handler reads the id).
_ID_ROUTES: dict[str, dict[str, dict[str, Handler]]] = {
    "/api/v1/keys/": {
        "": {"GET": key_item, "PATCH": key_item, "DELETE": key_item},
        "/rotate": {"POST": key_item},
    },
}
# Handlers that may run long; a client that leaves cancels them.
_WATCH_DISCONNECT = frozenset(
    {create_completion, create_chat_completion, tokenize, detokenize, tokenizer_info}
)
# Request ids are OpenAI's: `chatcmpl-...` for chat, `cmpl-...` for everything else.
_CHAT_PATHS = frozenset({"/api/v1/chat/completions", "/v1/chat/completions"})


def new_request_id(prefix: str) -> str:
    """`prefix` and 32 hex digits, time first (UUIDv7's layout, without its version bits): the
    milliseconds since the epoch at arrival, then 80 random bits. The ledger's primary key then
    grows near its end, as its time indexes do, rather than on a page a record: a commit of 90
    records wrote 152 WAL pages with random ids, 39 with these when answers finish in the order
    they came, some 50 when they take seconds, and took a sixth to a quarter less CPU
    (bench/README, 2026-12-03). Its holder learns when the request arrived; nothing is granted
    for knowing an id (a record is shown to who made it, or an admin), so the random bits are
    `random`'s (seeded from the OS, and again in each forked worker), not a syscall a request."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


# A route's name in the metrics: the API's name, whichever of its paths it came in on.
_ROUTE_NAMES = {
    path: path.removeprefix("/api").removeprefix("/v1").strip("/").replace("/", ".") for path in _ROUTES
} | {prefix: prefix.removeprefix("/api/v1").strip("/") for prefix in _ID_ROUTES}
_SAMPLE_SECONDS = 1.0  # how often the gauges of state (health, the ledger's backlog) are set


@dataclass(slots=True)
class Context:
    """What handlers need; built once per process, and again from the old one by each config
    reload (reload.py), for the requests that start after it. The accounts' parts (database,
    keys, ledger, limiter) need the event loop, so `start` builds them."""

    settings: Settings
    catalog: Catalog
    executor: Executor
    health: HealthBook
    openapi: bytes
    started_at: int
    metrics: Metrics | None = None  # None: `metrics.enabled` is off
    in_flight: InFlight = field(default_factory=InFlight)  # requests on this config, for a reload
    db: Database = field(init=False)
    keys: Keys = field(init=False)
    auth: Authenticator = field(init=False)
    ledger: Ledger = field(init=False)
    limiter: Limiter = field(init=False)
    _listener: Listener | None = field(init=False, default=None)
    reloader: Reloader = field(init=False)

    async def start(self) -> None:
        tracing.configure(self.settings.tracing)
        accounts = self.settings.accounts
        # The database's commits are always synchronous: records leave the journal (which
        # `ledger_sync` is about) only once they are on disk there.
        self.db = await open_database(
            accounts.database_url,
            llmrouter_home(self.settings),
            schema=accounts.database_schema,
            sync="full",
        )
        self.keys = Keys(self.db, cache_seconds=accounts.key_cache_seconds)
        await self.keys.start()
        self.auth = Authenticator(self.keys, jwt_authenticator(self.settings))
        metrics = self.metrics
        self.ledger = Ledger(
            self.db,
            journal=open_journal(self.db, accounts.ledger_sync),
            batch_max=accounts.ledger_batch_max,
            durable_timeout=accounts.ledger_wait_seconds,
            on_write_error=metrics.ledger_write_failed if metrics else _nothing,
        )
        self.ledger.start()
        # A request's concurrency slot frees itself after the longest it may run.
        lease = self.settings.routing.deadline_seconds + 60
        self.limiter = create_limiter(
            accounts,
            self.ledger.spent,
            lease_seconds=lease,
            on_redis_error=metrics.redis_failed("limits") if metrics else _nothing,
        )
        if metrics is not None:  # (before the providers: a taken address fails the start first)
            self._listener = start_listener(self.settings.metrics.listen, metrics)
        await self.health.start()
        for provider in self.catalog.providers.values():
            await provider.start()

    def sample(self) -> None:
        """Set the metrics' gauges of state now (a scrape asks just before reading)."""
        if self.metrics is not None:
            self.metrics.sample(self.catalog, self.ledger.pending)

    async def aclose(self) -> None:
        self.sample()  # (under --workers N, the last figures into the shared files)
        if self._listener is not None:
            self._listener.shutdown()
        for provider in self.catalog.providers.values():
            await provider.aclose()
        self.catalog.checks.close()
        await self.health.aclose()
        await self.limiter.aclose()
        await self.ledger.aclose()
        await self.db.aclose()
        tracing.shutdown()


def open_journal(db: Database, sync: Literal["full", "normal"]) -> Journal | None:
    """This process's ledger journal; None (answers wait for the database) if it cannot be made."""
    try:
        return Journal(db.journal_folder, table="ledger", columns=COLUMNS, key="request_id", sync=sync)
    except OSError as exc:
        log.error(
            "cannot open the ledger's journal in %s (%s): answers wait for the database",
            db.journal_folder,
            exc,
        )
        return None


def jwt_authenticator(settings: Settings) -> JwtAuthenticator | None:
    """Checks the JWT issuers' configuration (at start, in one line) and loads their keys."""
    if not settings.accounts.jwt:
        return None
    from llmrouter.accounts.jwt import JwtAuthenticator

    return JwtAuthenticator(settings.accounts.jwt, settings.accounts.policies)


def build_health(settings: Settings, metrics: Metrics | None = None) -> HealthBook:
    routing, accounts = settings.routing, settings.accounts
    local = LocalHealth(routing.health, alpha=routing.latency_ewma_alpha)
    if accounts.redis_url is None:
        return local
    from llmrouter.routing.shared_health import SharedHealth

    return SharedHealth(
        local,
        accounts.redis_url,
        channel=f"{accounts.redis_namespace}:health",
        on_error=metrics.redis_failed("health") if metrics else _nothing,
    )


def build_providers(settings: Settings) -> dict[str, Provider]:
    return {
        name: build_provider(
            name,
            provider_settings,
            [d for m in settings.models for d in m.deployments if d.provider == name],
            settings.checks,
        )
        for name, provider_settings in settings.providers.items()
    }


class App:
    def __init__(self, ctx: Context, config_path: str | None = None) -> None:
        self.ctx = ctx  # a config reload swaps it for new requests
        ctx.reloader = Reloader(self, config_path)
        self._sampler: asyncio.Task[None] | None = None
        self.dashboard = Dashboard(ctx) if ctx.settings.dashboard.enabled else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0
        metrics = self.ctx.metrics
        route = _route_name(scope["path"])
        if metrics is not None:
            metrics.started(route)

        async def send_and_watch(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        prefix = "chatcmpl-" if scope["path"] in _CHAT_PATHS else "cmpl-"
        req = Request(scope, receive, send_and_watch, new_request_id(prefix))
        span = tracing.start_request(req, route) if tracing.enabled() else None
        ctx = self.ctx  # this request keeps the config it started on to its end
        ctx.in_flight.enter()
        try:
            # The dashboard's pages (every path that normalises under its prefix) decide their
            # own methods and authorisation, in one place.
            if self.dashboard is not None and self.dashboard.claims(req.path):
                handler: Handler = self.dashboard.handle
            else:
                methods = _ROUTES.get(req.path) or _id_route(req.path)
                if methods is None:
                    raise NotFound(f"No route {quoted(req.path)}.")
                found = methods.get(req.method)
                if found is None:
                    raise MethodNotAllowed(
                        f"{quoted(req.path)} accepts {', '.join(methods)}.", allow=methods
                    )
                handler = found
            if handler in _WATCH_DISCONNECT:
                req.watch_disconnect = True
            try:
                await handler(req, ctx)
            finally:
                req.stop_watching()
        except (ConnectionAbortedError, asyncio.CancelledError):
            req.log["error"] = "client_disconnected"
            status = status or 499
        except Exception as exc:
            # In a method of its own: a local here naming the error would keep it, its traceback
            # this frame, and this frame the request with its headers and body, in a cycle that
            # only the cyclic collector frees (tests/unit/test_app.py).
            await self._fail(req, exc, responded=status != 0)
        finally:
            ctx.in_flight.leave()
            await self._record(req, status or 499, req.log.get("error"), durable=False)
            # A client that left mid-stream had its 200 sent: it ends as the ledger has it, 499.
            if req.log.get("error") == "client_disconnected":
                status = 499
            if metrics is not None:
                seconds = time.perf_counter() - started
                metrics.finished(ctx.catalog, route, status or 499, seconds, req.accounting)
            if span is not None:
                span.end(status or 499, req)
        if ctx.settings.server.access_log:
            req.log.update(
                request_id=req.request_id,
                method=req.method,
                path=req.path,
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )
            access_log(req.log)

    async def _fail(self, req: Request, exc: Exception, *, responded: bool) -> None:
        error = _as_llmrouter_error(exc, req.request_id)
        if self.ctx.metrics is not None:
            self.ctx.metrics.refused(error)
        if error.attempts:
            req.log.setdefault("attempts", error.attempts)
        req.log["error"] = error.code
        if not responded:
            # Like an answer, an error's record is durable before the client has it.
            await self._record(req, error.status, error.code, durable=True)
            await self._send_error(req, error)

    async def _record(self, req: Request, status: int, error: str | None, *, durable: bool) -> None:
        """The ledger record of a completion request the handler did not record itself (it
        failed, or the client left): waited for before an error is sent, else queued."""
        accounting = req.accounting
        if accounting is None or accounting.recorded:
            return
        accounting.recorded = True
        record = accounting.record(req.request_id, status, error)
        if durable:
            await self.ctx.ledger.commit(record)
        else:
            self.ctx.ledger.submit(record)

    @staticmethod
    async def _send_error(req: Request, exc: LlmrouterError) -> None:
        headers = [(b"x-request-id", req.request_id.encode()), *exc.headers()]
        if exc.attempts:
            headers.append((b"x-llmrouter-attempts", ", ".join(map(str, exc.attempts)).encode()))
        await send_bytes(req.send, exc.status, encoder.encode(exc.to_body()), headers)

    async def _sample_forever(self) -> None:
        """The metrics' gauges of state, of whichever config is serving (a reload swaps it)."""
        while True:
            self.ctx.sample()
            await asyncio.sleep(_SAMPLE_SECONDS)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.ctx.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self.ctx.reloader.install()
                if self.ctx.metrics is not None:
                    self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())
                # Everything built so far lives as long as the process: keep it out of the cyclic
                # collector's full passes, which otherwise stall every request (bench/README.md).
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sampler is not None:
                    self._sampler.cancel()
                await self.ctx.reloader.aclose()
                await self.ctx.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _as_llmrouter_error(exc: Exception, request_id: str) -> LlmrouterError:
    """What the client is told: our errors as they are, the store being unreachable as a 503,
    anything else as a 500 whose traceback is in the log (never in the answer)."""
    if isinstance(exc, LlmrouterError):
        return exc
    if isinstance(exc, StoreError):
        log.warning("database error: %s", exc, extra={"fields": {"request_id": request_id}})
        return ServiceUnavailable("The database cannot be reached; try again.", retry_after=1)
    log.exception("internal error", exc_info=exc, extra={"fields": {"request_id": request_id}})
    return LlmrouterError(f"Internal error; the request id {request_id} finds it in the log.")


def _nothing() -> None:
    return None


def _route_name(path: str) -> str:
    name = _ROUTE_NAMES.get(path)
    if name is not None:
        return name
    return next((_ROUTE_NAMES[p] for p in _ID_ROUTES if path.startswith(p)), "other")


def _id_route(path: str) -> dict[str, Handler] | None:
    for prefix, tails in _ID_ROUTES.items():
        if path.startswith(prefix):
            item, slash, tail = path.removeprefix(prefix).partition("/")
            return tails.get(slash + tail) if item else None
    return None


def create_app(settings: Settings, config_path: str | None = None) -> App:
    """The app serving `settings`; `config_path`, the file they came from, is what a reload
    reads again."""
    jwt_authenticator(settings)  # a bad issuer fails the start, not the first request
    providers = build_providers(settings)
    routing = settings.routing
    metrics = Metrics() if settings.metrics.enabled else None
    health = build_health(settings, metrics)
    rng = random.Random(routing.seed)  # noqa: S311 - load spreading and jitter, not secrets
    ctx = Context(
        settings=settings,
        catalog=Catalog(settings, providers, health, rng),
        executor=Executor(routing, health, rng),
        health=health,
        openapi=msgspec.json.encode(build_openapi()),
        started_at=int(time.time()),
        metrics=metrics,
    )
    return App(ctx, config_path)


def create_app_from_environment() -> App:
    """The factory each server worker calls: the config named by LLMROUTER_CONFIG, or the
    embedded default."""
    configure_logging(os.environ.get("LLMROUTER_LOG_LEVEL", "INFO"))  # workers start afresh
    # A SIGHUP before the lifespan installs the reload must not kill a worker (the default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    path = os.environ.get("LLMROUTER_CONFIG")
    return create_app(load_settings(path) if path else embedded_default(), path)
