"""The `llmrouter` command: serve, keys, usage, models."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec

from llmrouter.accounts.keys import ApiKey, KeyError_, Keys
from llmrouter.accounts.ledger import GROUPINGS, Ledger
from llmrouter.accounts.store import Database, StoreError, open_database
from llmrouter.settings import (
    ConfigError,
    Settings,
    embedded_default,
    llmrouter_home,
    load_settings,
)

__all__ = ["main"]

_EPILOG_MAIN = """\
examples:
  llmrouter serve                          # the embedded local model on http://127.0.0.1:8080
  llmrouter serve --config config/example.yaml --workers 2
  llmrouter keys create --name my-app --rpm 60 --credit-limit 5 --reset monthly
  llmrouter usage --since 2026-11-01 --by model
  llmrouter models
"""
T = TypeVar("T")


class CliError(Exception):
    """One line for the user; exit code 1."""


def _settings(path: str | None) -> Settings:
    path = path or os.environ.get("LLMROUTER_CONFIG")
    return load_settings(path) if path else embedded_default()


def _with_db(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Open the configured store (SQLite under the home, or PostgreSQL), run, close."""

    async def run() -> T:
        accounts = settings.accounts
        db = await open_database(
            accounts.database_url, llmrouter_home(settings), schema=accounts.database_schema
        )
        try:
            return await work(db)
        finally:
            await db.aclose()

    return asyncio.run(run())


def _with_keys(args: argparse.Namespace, work: Callable[[Keys], Awaitable[T]]) -> T:
    return _with_db(_settings(args.config), lambda db: work(Keys(db)))


_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, future: bool) -> int:
    """`2026-12-31`, `2026-12-31T18:00` (UTC unless it says), or a duration: `30d`, `12h`
    from now (`--expires`) or ago (`--since`)."""
    duration = _DURATION.match(text)
    try:
        if duration:
            seconds = int(duration.group(1)) * _UNIT_SECONDS[duration.group(2)]
            delta = dt.timedelta(seconds=min(seconds, 10**12))  # past year 9999: OverflowError
            now = dt.datetime.now(dt.UTC)
            return int((now + delta if future else now - delta).timestamp())
        when = dt.datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return int(when.timestamp())
    except (ValueError, OverflowError):
        raise CliError(f"{text!r} is not a date (2026-12-31), a time or a duration (30d)") from None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def shown(text: str) -> str:
    """Text for a terminal: control characters (escape sequences, newlines) as `\\xNN`."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def csv_cell(value: object) -> object:
    """A spreadsheet would run a cell starting with = + - @ as a formula: quote it."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def _when(seconds: int | float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- serve --------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    # SIGHUP reloads the config once the server has started (reload.py); until then it must not
    # be the default, which kills.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from llmrouter.obs.logging import configure_logging
    from llmrouter.server import MULTIPROCESS_ENV, ServeError, bind, serve

    settings = _settings(args.config)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    workers = args.workers or settings.server.workers
    if workers < 1:
        raise CliError(f"--workers must be at least 1 (got {workers})")
    if workers == 1:  # before the metrics' library is imported: one process keeps its own
        os.environ.pop(MULTIPROCESS_ENV, None)
    from llmrouter.app import build_providers

    build_providers(settings)  # fails here, in one line, on a missing model file
    if workers > 1 and settings.accounts.redis_url is None:
        print(
            f"llmrouter: warning: without accounts.redis_url each of the {workers} workers counts "
            "rate limits and credits for itself",
            file=sys.stderr,
        )
    try:
        sock = bind(host, port)
    except ServeError as exc:
        raise CliError(str(exc)) from None

    # The embedded store starts with a key, printed once. A shared database does not: replicas
    # would race to make one and print it to their logs; its keys are made with `keys create`.
    async def first_key(db: Database) -> str | None:
        keys = Keys(db)
        if await keys.count():
            return None
        try:
            return (await keys.create("default"))[1]
        except KeyError_:  # another process made it meanwhile
            return None

    try:
        if settings.accounts.database_url is None:
            secret = _with_db(settings, first_key)
            if secret is not None:
                _print_first_key(secret, host, port, settings)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    configure_logging(os.environ.get("LLMROUTER_LOG_LEVEL", "INFO"))
    try:
        serve(
            sock,
            workers,
            args.config or os.environ.get("LLMROUTER_CONFIG"),
            settings.server,
            settings.metrics,
        )
    except ServeError as exc:
        raise CliError(str(exc)) from None


def _print_first_key(secret: str, host: str, port: int, settings: Settings) -> None:
    model = settings.default_model or settings.models[0].id
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    print(
        f"""
llmrouter: first start — created an API key named "default". It is shown only this once:

    {secret}

Try it:

    curl http://{shown}:{port}/api/v1/completions \\
      -H "Authorization: Bearer {secret}" \\
      -H "Content-Type: application/json" \\
      -d '{{"model": "{model}", "prompt": "The capital of France is", "max_tokens": 16}}'
""",
        flush=True,
    )


# -- keys ---------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> None:
    from llmrouter.api.accounts import KeySpec

    settings = _settings(args.config)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    known = {name for m in settings.models for name in (m.id, *m.aliases)}
    for model in models or ():
        if model not in known:
            raise CliError(f"--models: no model named {model!r} in the configuration")
    try:
        spec = msgspec.convert(
            {
                "name": args.name,
                "owner": args.owner,
                "rpm": args.rpm,
                "tpm": args.tpm,
                "max_concurrent": args.max_concurrent,
                "credit_limit": args.credit_limit,
                "reset": args.reset,
                "models": models,
                "admin": args.admin,
            },
            KeySpec,
        )
    except msgspec.ValidationError as exc:
        raise CliError(str(exc)) from None
    expires = parse_time(args.expires, future=True) if args.expires else None
    key, secret = _with_keys(
        args,
        lambda keys: keys.create(
            spec.name, owner=spec.owner, policy=spec.policy(), expires_at=expires, admin=spec.admin
        ),
    )
    kind = "admin key" if key.admin else "key"
    print(f"created {kind} {key.id} named {key.name!r}; it is shown only this once:", file=sys.stderr)
    print(secret)


def cmd_keys_list(args: argparse.Namespace) -> None:
    from llmrouter.api.accounts import key_view

    keys = _with_keys(args, lambda k: k.list(include_revoked=args.all))
    if args.json:
        print(msgspec.json.encode([key_view(k) for k in keys]).decode())
        return
    if not keys:
        print("no keys")
        return
    print(f"{'ID':<14}{'NAME':<24}{'CREATED':<21}{'EXPIRES':<21}{'STATUS':<9}LIMITS")
    for key in keys:
        print(
            f"{key.id:<14}{shown(key.name):<24}{_when(key.created_at):<21}"
            f"{_when(key.expires_at):<21}{key.status:<9}{_limits_text(key)}"
        )


def _limits_text(key: ApiKey) -> str:
    p = key.policy
    parts = [f"{n}={v}" for n, v in (("rpm", p.rpm), ("tpm", p.tpm)) if v is not None]
    if p.max_concurrent is not None:
        parts.append(f"concurrent={p.max_concurrent}")
    if p.credit_limit is not None:
        parts.append(f"credit={p.credit_limit:g}" + (f"/{p.reset}" if p.reset else ""))
    if p.models is not None:
        parts.append("models=" + ",".join(sorted(p.models)))
    if key.admin:
        parts.append("admin")
    return " ".join(parts) or "-"


def cmd_keys_show(args: argparse.Namespace) -> None:
    from llmrouter.api.accounts import key_view

    key = _with_keys(args, lambda k: k.get(args.key, live=False))
    print(msgspec.json.format(msgspec.json.encode(key_view(key))).decode())


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    key = _with_keys(args, lambda k: k.revoke(args.key))
    print(f"revoked key {key.id} named {key.name!r}")


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    key, secret = _with_keys(args, lambda k: k.rotate(args.key))
    print(f"rotated key {key.id} named {key.name!r}; the old secret no longer works,", file=sys.stderr)
    print("and the new one is shown only this once:", file=sys.stderr)
    print(secret)


# -- usage --------------------------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> None:
    since = parse_time(args.since, future=False) if args.since else None
    until = parse_time(args.until, future=False) if args.until else None
    totals = _with_db(
        _settings(args.config),
        lambda db: Ledger(db).totals(since=since, until=until, by=args.by),
    )
    header = [args.by, "requests", "failed", "prompt_tokens", "completion_tokens", "cost"]
    rows = [
        [t.group, t.requests, t.failed, t.prompt_tokens, t.completion_tokens, round(t.cost, 9)]
        for t in totals
    ]
    if args.json:
        print(msgspec.json.encode([dict(zip(header, r, strict=True)) for r in rows]).decode())
    elif args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[csv_cell(cell) for cell in row] for row in rows])
    elif not rows:
        print("no usage in this period")
    else:
        for r in rows:
            r[0] = shown(str(r[0]))
        width = max(len(args.by), *(len(str(r[0])) for r in rows)) + 2
        print(
            f"{args.by.upper():<{width}}{'REQUESTS':>10}{'FAILED':>8}{'PROMPT':>12}"
            f"{'COMPLETION':>12}{'COST':>14}"
        )
        for r in rows:
            print(f"{r[0]!s:<{width}}{r[1]:>10}{r[2]:>8}{r[3]:>12}{r[4]:>12}{r[5]:>14.6f}")


# -- models -------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> None:
    settings = _settings(args.config)
    default = settings.default_model or settings.models[0].id
    print(f"{'MODEL':<40}{'PROVIDER':<12}{'KIND':<10}WHERE")
    for model in settings.models:
        for d in model.deployments:
            provider = settings.providers[d.provider]
            kind = type(provider).__struct_config__.tag
            where = getattr(provider, "base_url", None) or _local_where(d)
            mark = " (default)" if model.id == default else ""
            print(f"{model.id + mark:<40}{d.provider:<12}{kind!s:<10}{where} [{d.model}]")


def _local_where(deployment: object) -> str:
    from llmrouter.providers.llamacpp import resolve_model_path

    try:
        return f"in-process: {resolve_model_path(deployment)}"  # type: ignore[arg-type]
    except ConfigError as exc:
        return f"in-process: {exc}"


# -- wiring -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="llmrouter",
        description="A self-hosted LLM router speaking the Completions API.",
        epilog=_EPILOG_MAIN,
        formatter_class=fmt,
    )
    parser.add_argument(
        "--config", help="YAML config (default: $LLMROUTER_CONFIG, else the embedded model)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. On the first start it creates an API key and prints it.",
        epilog="examples:\n  llmrouter serve\n  llmrouter serve --port 9000 --workers 2\n"
        "  llmrouter serve --config config/example.yaml --host 0.0.0.0",
        formatter_class=fmt,
    )
    serve.add_argument("--config", default=argparse.SUPPRESS, help="YAML config file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys live in the store under LLMROUTER_HOME; only their hash is kept.",
        epilog="examples:\n  llmrouter keys create --name my-app\n  llmrouter keys list\n"
        "  llmrouter keys revoke my-app",
        formatter_class=fmt,
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser(
        "create",
        help="create a key; it is printed alone on the last line",
        epilog="example:\n  KEY=$(llmrouter keys create --name my-app | tail -n 1)",
        formatter_class=fmt,
    )
    create.add_argument("--name", required=True, help="a name unique among live keys")
    create.add_argument("--owner", help="who the key is for (a person or team)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute")
    create.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    create.add_argument("--credit-limit", type=float, metavar="AMOUNT", help="spend, in currency")
    create.add_argument(
        "--reset", choices=("daily", "weekly", "monthly"), help="the credit limit renews (UTC)"
    )
    create.add_argument("--models", metavar="ID,ID", help="the only models it may use")
    create.add_argument("--expires", metavar="DATE", help="2026-12-31, 2026-12-31T18:00, or 30d")
    create.add_argument("--admin", action="store_true", help="may use the admin API")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser(
        "list",
        help="list keys (never their secrets)",
        epilog="example:\n  llmrouter keys list --all",
        formatter_class=fmt,
    )
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(func=cmd_keys_list)
    # The actions on one key, named by id or name.
    one_key = []
    for action, help_, example, func in (
        (
            "show",
            "one key's details, as JSON (never its secret)",
            "llmrouter keys show my-app",
            cmd_keys_show,
        ),
        ("revoke", "revoke a key by id or name", "llmrouter keys revoke my-app", cmd_keys_revoke),
        (
            "rotate",
            "a new secret for a key (same id, limits and history); printed on the last line",
            "NEW=$(llmrouter keys rotate my-app | tail -n 1)",
            cmd_keys_rotate,
        ),
    ):
        parser_ = keys_sub.add_parser(
            action, help=help_, epilog=f"example:\n  {example}", formatter_class=fmt
        )
        parser_.add_argument("key", metavar="ID_OR_NAME")
        parser_.set_defaults(func=func)
        one_key.append(parser_)

    usage = sub.add_parser(
        "usage",
        help="usage and cost totals from the ledger",
        description="Totals of the usage ledger, grouped; times are UTC.",
        epilog="examples:\n  llmrouter usage\n  llmrouter usage --since 7d --by day\n"
        "  llmrouter usage --since 2026-11-01 --until 2026-12-01 --by key --csv",
        formatter_class=fmt,
    )
    usage.add_argument("--since", help="from (2026-11-01, 2026-11-01T12:00, or 7d ago)")
    usage.add_argument("--until", help="until (exclusive; same forms)")
    usage.add_argument("--by", choices=GROUPINGS, default="model", help="group by (default model)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="as JSON")
    output.add_argument("--csv", action="store_true", help="as CSV")
    usage.set_defaults(func=cmd_usage)

    models = sub.add_parser(
        "models",
        help="the configured models and where each is served",
        epilog="example:\n  llmrouter --config config/example.yaml models",
        formatter_class=fmt,
    )
    models.set_defaults(func=cmd_models)
    for p in (keys, create, listing, *one_key, usage, models):
        p.add_argument("--config", default=argparse.SUPPRESS, help="YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, ConfigError, StoreError, KeyError_) as exc:
        print(f"llmrouter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
