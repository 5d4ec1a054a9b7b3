"""The dashboard's one entry point and its pages, server-rendered (Jinja2, autoescaped).

`Dashboard.handle` takes every request whose normalised path is under `dashboard.path`, before the
JSON routes: it answers a non-normal path with a redirect to its normal form, lets only the login
form and the stylesheet through without a session, checks the session (its key still a live admin
key) for everything else, and refuses any POST that says it came from another origin or lacks the
session's CSRF token. Every response it sends carries the security headers (security.HEADERS),
errors and the stylesheet included. A page is one HTML response (the stylesheet and icon are
cached for an hour, their links naming their version).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import msgspec
from jinja2 import Environment, PackageLoader, StrictUndefined

from llmrouter.accounts.keys import PREFIX, KeyError_, KeyNameTaken
from llmrouter.accounts.store import StoreError
from llmrouter.admin import charts, queries
from llmrouter.admin.security import HEADERS, LoginLimiter, cross_site, normalise, under
from llmrouter.admin.sessions import COOKIE, Session, Sessions, session_cookie
from llmrouter.api.accounts import KeySpec, check_models
from llmrouter.api.http import Request
from llmrouter.errors import (
    AuthenticationFailed,
    InvalidRequest,
    LlmrouterError,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RateLimited,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    from llmrouter.app import Context

__all__ = ["Dashboard"]

log = logging.getLogger("llmrouter.admin")

_FORM_LIMIT = 1 << 16
_TOP = 8  # groups on a stacked chart before the rest are "other"
_CSV_TOP = 100  # groups in the CSV export, the rest summed in one row a step
_CSV_OTHER = "(other)"
_OTHER = "other"
_KEYS_PAGE = 50  # keys on a page of the keys list
_LABEL_MOST = 256  # characters in a key's name or owner made on the dashboard
_STATIC = {"dashboard.css": b"text/css; charset=utf-8", "favicon.svg": b"image/svg+xml"}
_PAGE_HEADERS = [*HEADERS, (b"cache-control", b"no-store")]
_STATIC_FILES = {
    name: resources.files("llmrouter.admin").joinpath("static", name).read_bytes() for name in _STATIC
}
# In the static files' links (?v=): a browser keeps them an hour, and fetches a changed one at once.
_STATIC_VERSION = hashlib.sha256(b"".join(_STATIC_FILES.values())).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class _Visit:
    """A request with a live session: what its page needs to know."""

    req: Request
    ctx: Context  # the config the request started on (a reload swaps it for later ones)
    session: Session
    sub: str  # the path after the dashboard's prefix ("" for the overview)
    query: dict[str, str]


Page = Callable[["Dashboard", _Visit], Awaitable[None]]


class Dashboard:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        settings = ctx.settings.dashboard
        self.prefix = settings.path
        self.limiter = LoginLimiter(settings.login_attempts_per_minute)
        self.env = Environment(
            loader=PackageLoader("llmrouter.admin", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
        )
        self.env.filters.update(when=_when, number=charts.number, ms=_ms, pct=_pct, money=_money)
        self.env.globals["version"] = _STATIC_VERSION
        self._sessions: Sessions | None = None

    @property
    def sessions(self) -> Sessions:
        if self._sessions is None:  # the store opens with the app's lifespan, after __init__
            self._sessions = Sessions(self.ctx.db, seconds=self.ctx.settings.dashboard.session_seconds)
        return self._sessions

    def claims(self, path: str) -> bool:
        return under(normalise(path), self.prefix)

    async def handle(self, req: Request, ctx: Context) -> None:
        """`self.ctx` holds the process's parts (the store, keys, ledger, health: the same in
        every config); what a config says (its models, its deployments, `store_prompts`) is read
        from the request's own `ctx`."""
        try:
            await self._route(req, ctx)
        except LlmrouterError as exc:
            await self._error(req, exc.status, exc.message, exc.headers())
        except StoreError as exc:
            log.warning("database error: %s", exc, extra={"fields": {"request_id": req.request_id}})
            await self._error(req, 503, "The database cannot be reached; try again.", [])
        except (ConnectionAbortedError, OSError):
            raise
        except Exception as exc:
            log.exception(
                "internal error", exc_info=exc, extra={"fields": {"request_id": req.request_id}}
            )
            await self._error(
                req, 500, f"Internal error; request id {req.request_id} is in the log.", []
            )

    async def _route(self, req: Request, ctx: Context) -> None:
        path = normalise(req.path)
        if req.method not in ("GET", "HEAD", "POST"):
            raise MethodNotAllowed("The dashboard takes GET and POST.", allow=("GET", "HEAD", "POST"))
        if path != req.path:  # served only at its normal form, where the checks below stand
            if req.method == "POST":
                raise NotFound("No such page.")
            query = "?" + _escape(req.query, "?%") if req.query else ""
            await self._redirect(req, _escape(path.encode()) + query, status=308)
            return
        sub = path.removeprefix(self.prefix)
        if sub.startswith("/static/"):
            await self._static(req, sub.removeprefix("/static/"))
            return
        if sub == "/login":
            await (self._login(req) if req.method == "POST" else self._login_form(req))
            return
        session = await self._session(req)
        if session is None:
            if req.method == "POST" and sub == "/logout":  # ended already: forget its cookie
                await self._redirect(req, f"{self.prefix}/login", headers=[self._cookie(req, "", 0)])
                return
            if req.method == "POST":
                raise PermissionDenied("Log in first: this session has ended.")
            await self._redirect(req, f"{self.prefix}/login")
            return
        params = {k: v[0] for k, v in parse_qs(req.query.decode("latin-1")).items()}
        visit = _Visit(req, ctx, session, sub, params)
        if req.method == "POST":
            form = await self._form(req, session)
            await self._post(visit, form)
            return
        # The pages show every request this server has answered (unless the database is down:
        # then they show what it has, after a second).
        await ctx.ledger.flush(patience=1.0)
        page = _GET.get(sub)
        if page is not None:
            await page(self, visit)
        elif sub.startswith("/log/"):
            await self._request(visit, sub.removeprefix("/log/"))
        elif sub.startswith("/keys/") and "/" not in sub.removeprefix("/keys/"):
            await self._key(visit, sub.removeprefix("/keys/"))
        else:
            raise NotFound("No such page.")

    # -- responses -------------------------------------------------------------------------------

    async def _send(
        self,
        req: Request,
        status: int,
        body: bytes,
        content_type: bytes = b"text/html; charset=utf-8",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        await req.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", req.request_id.encode()),
                    *_PAGE_HEADERS,
                    *headers,
                ],
            }
        )
        await req.send({"type": "http.response.body", "body": body})

    async def _render(
        self,
        req: Request,
        template: str,
        status: int = 200,
        headers: Sequence[tuple[bytes, bytes]] = (),
        **values: Any,
    ) -> None:
        values.setdefault("csrf", None)
        values.setdefault("nav", None)
        html = self.env.get_template(template).render(prefix=self.prefix, **values)
        await self._send(req, status, html.encode(), headers=headers)

    async def _error(
        self, req: Request, status: int, message: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> None:
        await self._render(req, "error.html", status, headers, code=status, message=message)

    async def _redirect(
        self,
        req: Request,
        location: str,
        *,
        status: int = 303,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        await self._send(req, status, b"", headers=[(b"location", location.encode()), *headers])

    async def _static(self, req: Request, name: str) -> None:
        content_type = _STATIC.get(name)
        if content_type is None:
            raise NotFound("No such file.")
        body = _STATIC_FILES[name]
        await req.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    *HEADERS,
                    # Kept an hour, so a page is one request (the links carry the version).
                    (b"cache-control", b"public, max-age=3600"),
                ],
            }
        )
        await req.send({"type": "http.response.body", "body": body})

    # -- login, sessions and forms ---------------------------------------------------------------

    def _scheme(self, req: Request) -> str:
        """This origin's scheme: https when `dashboard.secure_cookie` says TLS ends in front of
        us, else the connection's own."""
        if self.ctx.settings.dashboard.secure_cookie:
            return "https"
        return str(req.scope.get("scheme", "http"))

    def _cookie(self, req: Request, value: str, max_age: int) -> tuple[bytes, bytes]:
        secure = self.ctx.settings.dashboard.secure_cookie
        if secure is None:
            secure = req.scope.get("scheme") == "https"
        return (b"set-cookie", session_cookie(self.prefix, value, max_age, secure=secure).encode())

    async def _login_form(self, req: Request, status: int = 200, message: str | None = None) -> None:
        await self._render(req, "login.html", status, message=message)

    async def _login(self, req: Request) -> None:
        if cross_site(req.headers, self._scheme(req)):
            raise PermissionDenied("This form was sent from another site.")
        client = req.scope.get("client")
        address = str(client[0]) if client else ""
        if not self.limiter.allow(address):
            raise RateLimited("Too many failed logins; wait a minute.", retry_after=60)
        form = await _read_form(req)
        token = form.get("key", "").strip()
        try:
            if not token.startswith(PREFIX):
                raise AuthenticationFailed("Invalid API key.")
            principal = await self.ctx.keys.authenticate(token)
        except AuthenticationFailed as exc:
            if self.limiter.failed(address):
                raise RateLimited("Too many failed logins; wait a minute.", retry_after=60) from None
            await self._login_form(req, 401, exc.message)
            return
        if not principal.admin or principal.key_id is None:
            await self._login_form(req, 403, "This key is not an admin key.")
            return
        session_id, _ = await self.sessions.create(principal.key_id)
        cookie = self._cookie(req, session_id, self.sessions.seconds)
        await self._redirect(req, self.prefix, headers=[cookie])

    async def _session(self, req: Request) -> Session | None:
        """The request's live session whose key is still a live admin key, or None."""
        session_id = _cookie_value(req.headers.get(b"cookie", b"").decode("latin-1"), COOKIE)
        if session_id is None:
            return None
        session = await self.sessions.get(session_id)
        if session is None:
            return None
        try:
            key = await self.ctx.keys.get(session.key_id)
        except KeyError_:
            return None
        return session if key.admin and key.status == "active" else None

    async def _form(self, req: Request, session: Session) -> dict[str, str]:
        """A state-changing request's form, once it has shown it is the session's own: sent from
        this origin, with the session's CSRF token."""
        if cross_site(req.headers, self._scheme(req)):
            raise PermissionDenied("This form was sent from another site.")
        form = await _read_form(req)
        if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            raise PermissionDenied("This form's CSRF token is missing or wrong; reload the page.")
        return form

    async def _post(self, visit: _Visit, form: dict[str, str]) -> None:
        sub = visit.sub
        if sub == "/logout":
            await self._logout(visit)
        elif sub == "/keys":
            await self._create_key(visit, form)
        elif sub.startswith("/keys/"):
            key_id, _, action = sub.removeprefix("/keys/").partition("/")
            if action not in ("limits", "rotate", "revoke"):
                raise NotFound("No such page.")
            await self._change_key(visit, key_id, action, form)
        else:
            raise NotFound("No such page.")

    async def _logout(self, visit: _Visit) -> None:
        req = visit.req
        session_id = _cookie_value(req.headers.get(b"cookie", b"").decode("latin-1"), COOKIE)
        if session_id is not None:
            await self.sessions.delete(session_id)
        await self._redirect(req, f"{self.prefix}/login", headers=[self._cookie(req, "", 0)])

    # -- the pages -------------------------------------------------------------------------------

    def _range(self, visit: _Visit) -> tuple[str, int, int, int]:
        """The range the URL asks for (default 24h): its name, first rollup hour, step, and the
        steps' start."""
        name = visit.query.get("range", "24h")
        if name not in queries.RANGES:
            raise InvalidRequest(f"The range must be one of {', '.join(queries.RANGES)}.", param="range")
        seconds, step = queries.RANGES[name]
        since = queries.since_hour(seconds)
        return name, since, step, since // step * step

    async def _page(self, visit: _Visit, template: str, nav: str, **values: Any) -> None:
        await self._render(visit.req, template, csrf=visit.session.csrf, nav=nav, **values)

    async def overview(self, visit: _Visit) -> None:
        db = self.ctx.db
        name, since, step, start = self._range(visit)
        total = await queries.summary(db, since)
        steps = _steps(start, step)
        overall = await queries.series(db, since, step)
        by_model = await queries.series(db, since, step, by="model", top=_TOP)
        requests = _stacked(overall, steps, lambda p: p.requests - p.errors, lambda _: "succeeded")
        errors = _stacked(overall, steps, lambda p: p.errors, lambda _: "failed")
        labels = [_step_label(at, step) for at in steps]
        traffic = charts.bars(
            "Requests over time", labels, [*requests, *errors], colours=("#59a14f", "#e15759")
        )
        spend = charts.bars(
            "Spend by model",
            labels,
            _stacked(by_model, steps, lambda p: p.cost, _group_label),
            fmt=_money,
        )
        await self._page(
            visit, "overview.html", "overview", range=name, total=total, traffic=traffic, spend=spend
        )

    async def usage(self, visit: _Visit) -> None:
        db = self.ctx.db
        name, since, step, start = self._range(visit)
        by = visit.query.get("by", "model")
        if by not in queries.GROUP_COLUMNS:
            raise InvalidRequest("Group by key, model or provider.", param="by")
        spent = await queries.series(db, since, step, by=by, top=_TOP, rank="cost")
        used = await queries.series(db, since, step, by=by, top=_TOP, rank="tokens")
        keys = await queries.top_keys(db, since)
        label: Callable[[str], str] = _group_label
        if by == "key":
            shown = {p.group for p in (*spent, *used) if p.group is not None}
            names = await self._key_names([*shown, *(k.principal for k in keys)])
            label = _principal_label(names)
        else:
            names = await self._key_names([k.principal for k in keys])
        steps = _steps(start, step)
        labels = [_step_label(at, step) for at in steps]
        spend = charts.bars(
            f"Spend by {by}", labels, _stacked(spent, steps, lambda p: p.cost, label), fmt=_money
        )
        tokens = charts.bars(f"Tokens by {by}", labels, _stacked(used, steps, lambda p: p.tokens, label))
        rows = [(k, names.get(k.principal, k.principal)) for k in keys]
        csv_url = f"{self.prefix}/usage.csv?" + urlencode({"range": name, "by": by})
        await self._page(
            visit,
            "usage.html",
            "usage",
            range=name,
            by=by,
            spend=spend,
            tokens=tokens,
            keys=rows,
            csv_url=csv_url,
        )

    async def usage_csv(self, visit: _Visit) -> None:
        name, since, step, _ = self._range(visit)
        by = visit.query.get("by", "model")
        if by not in queries.GROUP_COLUMNS:
            raise InvalidRequest("Group by key, model or provider.", param="by")
        points = await queries.series(self.ctx.db, since, step, by=by, top=_CSV_TOP)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["start_utc", by, "requests", "errors", "tokens", "cost"])
        for p in points:
            group = _CSV_OTHER if p.group is None else _cell(p.group)
            writer.writerow([_when(p.at), group, p.requests, p.errors, p.tokens, repr(p.cost)])
        disposition = f'attachment; filename="llmrouter-usage-{by}-{name}.csv"'.encode()
        await self._send(
            visit.req,
            200,
            out.getvalue().encode(),
            b"text/csv; charset=utf-8",
            [(b"content-disposition", disposition)],
        )

    async def reliability(self, visit: _Visit) -> None:
        db = self.ctx.db
        name, since, _, _ = self._range(visit)
        rows = await queries.deployments(db, since)
        failures = await queries.outcomes(db, since)
        total = await queries.summary(db, since)
        health = self.ctx.health
        now = [
            {
                "label": t.label,
                "model": t.model.id,
                "state": health.state(t.label),
                "out_for": health.unavailable_for(t.label),
                "ejections": health.ejections(t.label),
                "in_flight": health.in_flight(t.label),
                "latency": health.latency(t.label),
            }
            for t in visit.ctx.catalog.all_targets()
        ]
        chart = charts.bars(
            "Failed requests by outcome",
            [code for code, _ in failures],
            [("requests", [float(n) for _, n in failures])],
            colours=("#e15759",),
        )
        await self._page(
            visit,
            "reliability.html",
            "reliability",
            range=name,
            deployments=rows,
            failures=failures,
            chart=chart,
            total=total,
            health=now,
        )

    async def request_log(self, visit: _Visit) -> None:
        q = visit.query
        name, since, _, _ = self._range(visit)
        key = q.get("key", "").strip()
        principal = None if not key else key if ":" in key else f"key:{key}"
        status = q.get("status", "").strip() or None
        if (
            status is not None
            and status not in ("ok", "failed")
            and not (status.isdigit() and len(status) == 3)
        ):
            raise InvalidRequest("The status must be ok, failed or an HTTP status.", param="status")
        where = queries.LogFilter(
            since=float(since),
            principal=principal,
            model=q.get("model", "").strip() or None,
            provider=q.get("provider", "").strip() or None,
            status=status,
        )
        after = None
        if q.get("after"):
            after = queries.Cursor.decode(q["after"])
            if after is None:
                raise InvalidRequest("This page's cursor is malformed.", param="after")
        page = await queries.log_page(self.ctx.db, where, after)
        kept = {k: v for k, v in q.items() if k != "after" and v}
        older = None
        if page.next is not None:
            older = f"{self.prefix}/log?" + urlencode({**kept, "after": page.next.encode()})
        names = await self._key_names([row.principal for row in page.rows])
        await self._page(
            visit,
            "log.html",
            "log",
            range=name,
            page=page,
            older=older,
            newest=f"{self.prefix}/log?" + urlencode(kept) if after is not None else None,
            filters=q,
            names=names,
            quote=quote,
        )

    async def _request(self, visit: _Visit, request_id: str) -> None:
        record = None if len(request_id) > 256 else await self.ctx.ledger.get(request_id)
        if record is None:
            raise NotFound("No request with this id in the ledger.")
        names = await self._key_names([record.principal])
        attempts = [_attempt(a) for a in record.attempts]
        await self._page(
            visit,
            "request.html",
            "log",
            record=record,
            attempts=attempts,
            who=names.get(record.principal, record.principal),
            stored=visit.ctx.settings.accounts.store_prompts,
            failed=record.status >= 400 or record.error is not None,
        )

    async def keys(self, visit: _Visit, *, status: int = 200, message: str | None = None) -> None:
        """The keys in the order they were made, a page at a time (by keyset: `after` names the
        last key of the page before)."""
        after = None
        if visit.query.get("after"):
            at, sep, key_id = visit.query["after"].partition("~")
            if not (sep and at.isascii() and at.isdigit() and len(at) < 20 and 0 < len(key_id) <= 64):
                raise InvalidRequest("This page's cursor is malformed.", param="after")
            after = (int(at), key_id)
        keys = await self.ctx.keys.page(after, _KEYS_PAGE + 1)
        more = None
        if len(keys) > _KEYS_PAGE:
            keys = keys[:_KEYS_PAGE]
            more = f"{self.prefix}/keys?" + urlencode({"after": f"{keys[-1].created_at}~{keys[-1].id}"})
        await self._render(
            visit.req,
            "keys.html",
            status,
            csrf=visit.session.csrf,
            nav="keys",
            keys=keys,
            more=more,
            first=f"{self.prefix}/keys" if after is not None else None,
            message=message,
            models=sorted(visit.ctx.catalog.models),
            most=_LABEL_MOST,
        )

    async def _key(
        self, visit: _Visit, key_id: str, *, secret: str | None = None, message: str | None = None
    ) -> None:
        try:
            key = await self.ctx.keys.get(key_id, live=False)
        except KeyError_:
            raise NotFound("No key with this id.") from None
        if key.id != key_id:
            raise NotFound("No key with this id.")  # (a name is not a key's page)
        principal = f"key:{key.id}"
        since = queries.since_hour(30 * 86400)
        total = await queries.summary(self.ctx.db, since, principal)
        step = 86400
        steps = _steps(since // step * step, step)
        points = await queries.series(
            self.ctx.db, since, step, by="model", principal=principal, top=_TOP
        )
        chart = charts.bars(
            "Spend by model, 30 days",
            [_step_label(at, step) for at in steps],
            _stacked(points, steps, lambda p: p.cost, _group_label),
            fmt=_money,
        )
        await self._render(
            visit.req,
            "key.html",
            400 if message else 200,
            csrf=visit.session.csrf,
            nav="keys",
            key=key,
            secret=secret,
            message=message,
            total=total,
            chart=chart,
            models=sorted(visit.ctx.catalog.models),
            own=key.id == visit.session.key_id,
        )

    async def _create_key(self, visit: _Visit, form: dict[str, str]) -> None:
        try:
            for field in ("name", "owner"):
                if len(form.get(field, "")) > _LABEL_MOST:
                    raise InvalidRequest(
                        f"A key's {field} made here is at most {_LABEL_MOST} characters.", param=field
                    )
            spec = self._spec(visit.ctx, form, form.get("name", ""))
            key, secret = await self.ctx.keys.create(
                spec.name, owner=spec.owner, policy=spec.policy(), admin=spec.admin
            )
        except KeyNameTaken:
            await self.keys(visit, status=409, message="A live key with this name exists already.")
            return
        except (KeyError_, InvalidRequest) as exc:
            await self.keys(visit, status=400, message=_sentence(str(exc)))
            return
        await self._key(visit, key.id, secret=secret)

    async def _change_key(self, visit: _Visit, key_id: str, action: str, form: dict[str, str]) -> None:
        keys = self.ctx.keys
        try:
            key = await keys.get(key_id)
        except KeyError_:
            raise NotFound("No live key with this id.") from None
        if action == "revoke":
            await keys.revoke(key.id)
            await self._redirect(visit.req, f"{self.prefix}/keys/{quote(key.id)}")
        elif action == "rotate":
            _, secret = await keys.rotate(key.id)
            await self._key(visit, key.id, secret=secret)
        else:
            try:
                spec = self._spec(visit.ctx, form, key.name)
            except InvalidRequest as exc:
                await self._key(visit, key.id, message=_sentence(str(exc)))
                return
            await keys.update(key.id, policy=spec.policy())
            await self._redirect(visit.req, f"{self.prefix}/keys/{quote(key.id)}")

    def _spec(self, ctx: Context, form: dict[str, str], name: str) -> KeySpec:
        """A key form's fields, checked as the admin API checks a new key's."""
        fields: dict[str, Any] = {"name": name, "admin": form.get("admin") == "on"}
        if form.get("owner", "").strip():
            fields["owner"] = form["owner"].strip()
        for field in ("rpm", "tpm", "max_concurrent", "credit_limit", "reset"):
            value = form.get(field, "").strip()
            if value:
                fields[field] = value
        models = [m.strip() for m in form.get("models", "").split(",") if m.strip()]
        if models:
            fields["models"] = models
        try:
            spec = msgspec.convert(fields, KeySpec, strict=False)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `$")
            raise InvalidRequest(f"{where.rstrip('`').lstrip('.')}: {message}", param=where) from None
        check_models(ctx, spec.models)
        return spec

    async def _key_names(self, principals: Iterable[str]) -> dict[str, str]:
        """Principal -> the key's name, for these principals only (revoked keys too)."""
        ids = {p.removeprefix("key:") for p in principals if p.startswith("key:")}
        names = await self.ctx.keys.names(ids)
        return {f"key:{key_id}": name for key_id, name in names.items()}


_GET: dict[str, Page] = {
    "": Dashboard.overview,
    "/usage": Dashboard.usage,
    "/usage.csv": Dashboard.usage_csv,
    "/reliability": Dashboard.reliability,
    "/log": Dashboard.request_log,
    "/keys": Dashboard.keys,
}


async def _read_form(req: Request) -> dict[str, str]:
    media = (req.header(b"content-type") or "").split(";", 1)[0].strip().lower()
    body = await req.body(_FORM_LIMIT)
    if media != "application/x-www-form-urlencoded" and (body or media):  # (empty: no fields)
        raise UnsupportedMediaType("The dashboard takes forms (application/x-www-form-urlencoded).")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form is malformed.") from None
    return {k: v[0] for k, v in fields.items()}


def _escape(raw: bytes, also: str = "") -> str:
    """A path's bytes (or, with `also="?%"`, a query's, still escaped) as a Location header can
    carry them: the server decoded a path's escapes, so it may hold CR, LF, NUL or any
    character, and each is percent-encoded again to name the same path."""
    return quote(raw, safe="/!$&'()*+,;=:@-._~" + also)


def _cookie_value(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name and value:
            return value
    return None


def _steps(start: int, step: int) -> list[int]:
    return list(range(start, int(time.time()) + 1, step))


def _stacked(
    points: Sequence[queries.Point],
    steps: Sequence[int],
    value: Callable[[queries.Point], float],
    label: Callable[[str], str],
) -> list[tuple[str, list[float]]]:
    """Series per group on the steps: the largest `_TOP` groups by total, the rest (and the
    query's own rest, group None) as "other". Each series is one group, whatever its label: two
    groups that label alike (two keys of one name, a key named "other") are told apart."""
    totals: dict[str, float] = defaultdict(float)
    rest = False
    for p in points:
        if p.group is None:
            rest = rest or value(p) > 0
        else:
            totals[p.group] += value(p)
    ranked = sorted((g for g in totals if totals[g] > 0), key=lambda g: (-totals[g], g))
    shown = ranked if len(ranked) <= _TOP and not rest else ranked[: _TOP - 1]
    index = {at: i for i, at in enumerate(steps)}
    series = {g: [0.0] * len(steps) for g in shown}
    other = [0.0] * len(steps)
    for p in points:
        i = index.get(p.at)
        if i is None:
            continue
        row = None if p.group is None else series.get(p.group)
        (other if row is None else row)[i] += value(p)
    labels = [label(g) for g in shown]
    seen = Counter(labels)
    out = [
        (f"{name} ({g.removeprefix('key:')})" if seen[name] > 1 or name == _OTHER else name, series[g])
        for name, g in zip(labels, shown, strict=True)
    ]
    return [*out, (_OTHER, other)] if any(other) else out


def _principal_label(names: dict[str, str]) -> Callable[[str], str]:
    return lambda principal: names.get(principal, principal or "(unauthenticated)")


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run: one that starts with a formula's sign (= + - @,
    after any blanks), or with a tab or a carriage return, is given a leading quote (OWASP)."""
    if text[:1] in ("\t", "\r") or text.lstrip()[:1] in ("=", "+", "-", "@"):
        return "'" + text
    return text


def _group_label(group: str) -> str:
    return group or "(none)"


def _step_label(at: int, step: int) -> str:
    return time.strftime("%m-%d" if step >= 86400 else "%m-%d %H:00", time.gmtime(at))


def _when(at: float | None) -> str:
    return "" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def _money(value: float) -> str:
    return f"{value:,.2f}" if value >= 1 else f"{value:.4g}"


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _attempt(text: str) -> dict[str, str]:
    """One attempt as the ledger keeps it ("provider/model outcome 12ms note") in its parts."""
    parts = text.split(" ", 3)
    parts += [""] * (4 - len(parts))
    return {"deployment": parts[0], "outcome": parts[1], "time": parts[2], "note": parts[3]}
