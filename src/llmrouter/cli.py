"""The `llmrouter` command: serve, keys, models."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from llmrouter.accounts.keys import KeyError_, Keys
from llmrouter.accounts.store import Store, StoreError
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
  llmrouter keys create --name my-app      # the key is the last line printed
  llmrouter models
"""


class CliError(Exception):
    """One line for the user; exit code 1."""


def _settings(path: str | None) -> Settings:
    path = path or os.environ.get("LLMROUTER_CONFIG")
    return load_settings(path) if path else embedded_default()


def _keys(args: argparse.Namespace) -> Keys:
    return Keys(Store.in_home(llmrouter_home(_settings(args.config))))


# -- serve --------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from llmrouter.app import build_providers
    from llmrouter.obs.logging import configure_logging
    from llmrouter.server import ServeError, bind, serve

    settings = _settings(args.config)
    build_providers(settings)  # fails here, in one line, on a missing model file
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    workers = args.workers or settings.server.workers
    if workers < 1:
        raise CliError(f"--workers must be at least 1 (got {workers})")
    try:
        sock = bind(host, port)
    except ServeError as exc:
        raise CliError(str(exc)) from None
    keys = Keys(Store.in_home(llmrouter_home(settings)))
    if keys.count() == 0:
        _print_first_key(keys, host, port, settings)
    configure_logging(os.environ.get("LLMROUTER_LOG_LEVEL", "INFO"))
    serve(sock, workers, args.config or os.environ.get("LLMROUTER_CONFIG"))


def _print_first_key(keys: Keys, host: str, port: int, settings: Settings) -> None:
    _, secret = keys.create("default")
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
    key, secret = _keys(args).create(args.name)
    print(f"created key {key.id} named {key.name!r}; it is shown only this once:", file=sys.stderr)
    print(secret)


def cmd_keys_list(args: argparse.Namespace) -> None:
    keys = _keys(args).list(include_revoked=args.all)
    if not keys:
        print("no keys")
        return
    print(f"{'ID':<14}{'NAME':<24}{'CREATED':<22}STATUS")
    for key in keys:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created_at))
        status = "revoked" if key.revoked_at else "active"
        print(f"{key.id:<14}{key.name:<24}{created:<22}{status}")


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    key = _keys(args).revoke(args.key)
    print(f"revoked key {key.id} named {key.name!r}")


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
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser(
        "list",
        help="list keys (never their secrets)",
        epilog="example:\n  llmrouter keys list --all",
        formatter_class=fmt,
    )
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser(
        "revoke",
        help="revoke a key by id or name",
        epilog="example:\n  llmrouter keys revoke my-app",
        formatter_class=fmt,
    )
    revoke.add_argument("key", metavar="ID_OR_NAME")
    revoke.set_defaults(func=cmd_keys_revoke)

    models = sub.add_parser(
        "models",
        help="the configured models and where each is served",
        epilog="example:\n  llmrouter --config config/example.yaml models",
        formatter_class=fmt,
    )
    models.set_defaults(func=cmd_models)
    for p in (keys, create, listing, revoke, models):
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
