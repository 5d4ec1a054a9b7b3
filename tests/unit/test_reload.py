"""The reload in process: what a new Context keeps of the old one, what it builds anew, and when
what it replaced is closed (the real router's reloads: tests/integration/test_reload.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from llmrouter.app import App, create_app
from llmrouter.settings import ConfigError, load_settings

CONFIG = """home: {home}
providers:
  local: {{kind: llamacpp, n_ctx: 512}}
  up: {{kind: openai, base_url: "http://127.0.0.1:9/v1", api_key: {key}}}
models:
  - id: local/smollm2
    aliases: [{alias}]
    deployments: [{{provider: local, model: smollm2-135m-instruct}}]
  - {{id: up/ok, deployments: [{{provider: up, model: ok}}]}}
{extra}"""


def _write(path: Path, *, key: str = "k1", alias: str = "small", extra: str = "") -> None:
    path.write_text(CONFIG.format(home=path.parent / "home", key=key, alias=alias, extra=extra))


def _run(path: Path, test: Callable[[App], Awaitable[None]]) -> None:
    async def main() -> None:
        app = create_app(load_settings(path), str(path))
        await app.ctx.start()
        try:
            await test(app)
        finally:
            await app.ctx.reloader.aclose()
            await app.ctx.aclose()

    asyncio.run(main())


def test_a_changed_alias_keeps_every_provider_and_the_loaded_model(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    _write(config)

    async def test(app: App) -> None:
        old = app.ctx
        local = old.catalog.providers["local"]
        engines = dict(local._engines)  # type: ignore[attr-defined]
        _write(config, alias="tiny")
        changes = await old.reloader.reload()
        new = app.ctx
        assert new is not old and changes.status == "reloaded"
        assert changes.models.changed == ["local/smollm2"] and changes.providers.rebuilt == []
        assert "tiny" in new.catalog.models and "small" not in new.catalog.models
        assert new.catalog.providers["local"] is local
        assert local._engines == engines  # type: ignore[attr-defined]
        assert new.catalog.providers["up"] is old.catalog.providers["up"]
        # The process's parts pass over as they are; the config's are the new ones.
        for part in ("db", "keys", "ledger", "limiter", "health", "executor", "openapi"):
            assert getattr(new, part) is getattr(old, part), part
        assert new.auth is not old.auth and new.in_flight is not old.in_flight
        await asyncio.sleep(0.05)  # the old Context is retired: what the new one uses stays open
        assert new.catalog.providers["up"].usable(new.catalog.targets["up/ok"][0].deployment)

    _run(config, test)


def test_a_changed_provider_is_closed_when_its_requests_end(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    _write(config)

    async def test(app: App) -> None:
        old = app.ctx
        up = old.catalog.providers["up"]
        deployment = old.catalog.targets["up/ok"][0].deployment
        old.in_flight.enter()  # a request that started before the reload
        _write(config, key="k2")
        changes = await old.reloader.reload()
        assert changes.providers.rebuilt == ["up"]
        fresh = app.ctx.catalog.providers["up"]
        assert fresh is not up and fresh.usable(deployment)
        assert app.ctx.catalog.providers["local"] is old.catalog.providers["local"]
        await asyncio.sleep(0.05)
        assert up.usable(deployment), "closed under a request in flight"
        old.in_flight.leave()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not up.usable(deployment):
                break
        assert not up.usable(deployment), "not closed once its last request ended"
        assert fresh.usable(deployment)

    _run(config, test)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("server: {port: 9999}", "server.port cannot change without a restart"),
        ("accounts: {redis_url: 'redis://127.0.0.1:1'}", "accounts.redis_url cannot change"),
        ("routing: {deadline_seconds: 5}", "routing.deadline_seconds cannot change"),
        ("bogus: 1", r"bogus \(line \d+\): unknown key"),
        ("default_model: nowhere", "default_model 'nowhere' is not one of the configured models"),
    ],
)
def test_a_refused_reload_changes_nothing(tmp_path: Path, extra: str, error: str) -> None:
    config = tmp_path / "config.yaml"
    _write(config)

    async def test(app: App) -> None:
        old = app.ctx
        _write(config, key="k2", alias="tiny", extra=extra)
        with pytest.raises(ConfigError, match=error):
            await old.reloader.reload()
        assert app.ctx is old
        assert old.catalog.providers["up"].usable(old.catalog.targets["up/ok"][0].deployment)

    _run(config, test)


def test_a_provider_that_cannot_start_is_refused_and_closed(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    _write(config)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF not really" * 100)

    async def test(app: App) -> None:
        old = app.ctx
        text = config.read_text().replace(
            "models:",
            "  other: {kind: llamacpp}\nmodels:\n"
            f"  - {{id: other/junk, deployments: [{{provider: other, model: junk, "
            f"model_path: {junk}}}]}}",
        )
        config.write_text(text)
        with pytest.raises(ConfigError, match="deployment other/junk did not start"):
            await old.reloader.reload()
        assert app.ctx is old and "other/junk" not in old.catalog.models

    _run(config, test)


def test_without_a_file_there_is_nothing_to_reload(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    _write(config)

    async def main() -> None:
        app = create_app(load_settings(config))  # as the embedded default is served: no file
        with pytest.raises(ConfigError, match="started without a config file"):
            await app.ctx.reloader.request()

    asyncio.run(main())


def test_new_health_thresholds_apply_to_what_the_book_knows(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    _write(config, extra="routing: {health: {consecutive_failures: 1000}}\n")

    async def test(app: App) -> None:
        book = app.ctx.health
        for _ in range(3):
            book.record("up/ok", False)
        assert book.state("up/ok") == "closed"
        _write(config, extra="routing: {health: {consecutive_failures: 4}}\n")
        changes = await app.ctx.reloader.reload()
        assert changes.settings == ["routing"] and app.ctx.health is book
        book.record("up/ok", False)  # the fourth in a row: over the new threshold
        assert book.state("up/ok") == "ejected"

    _run(config, test)


def test_a_changed_weight_priority_or_price_keeps_the_loaded_model(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    _write(config)

    async def test(app: App) -> None:
        old = app.ctx
        local = old.catalog.providers["local"]
        text = config.read_text().replace(
            "{provider: local, model: smollm2-135m-instruct}",
            "{provider: local, model: smollm2-135m-instruct, weight: 3, priority: 2, "
            "pricing: {prompt: 1, completion: 2}}",
        )
        config.write_text(text)
        changes = await old.reloader.reload()
        assert changes.status == "reloaded" and changes.providers.rebuilt == []
        assert app.ctx.catalog.providers["local"] is local
        target = app.ctx.catalog.targets["local/smollm2"][0]
        assert target.deployment.weight == 3 and target.pricing.completion == 2  # in force

    _run(config, test)


def test_a_post_whose_supervisor_is_gone_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker orphaned by its supervisor's death must not signal whatever has its pid now."""
    from llmrouter.errors import ServiceUnavailable

    config = tmp_path / "config.yaml"
    _write(config)
    monkeypatch.setenv("LLMROUTER_SUPERVISOR_PID", "1")  # not this process's parent

    async def test(app: App) -> None:
        _write(config, alias="other")
        with pytest.raises(ServiceUnavailable):
            await app.ctx.reloader.request()
        assert "small" in app.ctx.catalog.models  # nothing changed

    _run(config, test)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(config)


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:65536", "nohost"])
def test_a_metrics_address_out_of_range_is_a_config_error(tmp_path: Path, listen: str) -> None:
    config = tmp_path / "config.yaml"
    _write(config, extra=f"metrics: {{listen: '{listen}'}}\n")
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_settings(config)
